"""Open Inference Protocol requests that are malformed in ways JSON allows: 400, never 500."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from servicekit import auth

from cellinspect.serving.errors import RequestError
from cellinspect.serving.oip import _flatten, parse_infer_request

MAX = 64  # elements the parser may accept


def parse(doc: object | bytes) -> object:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return parse_infer_request(body, None, max_elements=MAX)


def tensor(**fields: object) -> dict[str, object]:
    return {"inputs": [{"name": "image", "datatype": "FP32", **fields}]}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (tensor(shape=[0, 1, 8, 8], data=[]), "holds no elements"),
        (tensor(shape=[True, 1, 8, 8], data=[0.0] * 64), "non-negative integers"),
        (tensor(shape=[2**32, 2**32], data=[]), "non-negative integers"),
        (tensor(shape=[8] * 9, data=[]), "at most 8"),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1'
            + b"0" * 5000
            + b"]}]}",
            "4300 digits",
        ),
        (b"[" * 100_000, "nested too deeply"),
    ],
    ids=["empty-batch", "bool-dim", "huge-dims", "rank-9", "5000-digit-int", "deep-nesting"],
)
def test_malformed_requests_are_400_naming_the_problem(doc: object, message: str) -> None:
    with pytest.raises(RequestError) as info:
        parse(doc)
    assert info.value.status == 400 and info.value.code == "bad_infer_request"
    assert message in info.value.detail


def test_element_count_does_not_wrap_around() -> None:
    # numpy's int64 product of these is 0: the count check passed and reshape failed (500).
    body = json.dumps(tensor(shape=[65_536] * 4, data=[])).encode()
    with pytest.raises(RequestError, match="18446744073709551616 elements exceed the limit"):
        parse_infer_request(body, None, max_elements=1_000_000)


def test_deeply_nested_data_is_flattened_without_recursion() -> None:
    data: list[object] = [1.5]
    for _ in range(5_000):
        data = [data]
    assert _flatten(data) == [1.5]
    assert _flatten([1, [2, [3, []], 4], [[5]]]) == [1, 2, 3, 4, 5]


def test_empty_fp32_batch_through_the_route_is_400_not_500(client: TestClient) -> None:
    request = tensor(shape=[0, 1, 8, 8], data=[])
    r = client.post("/v2/models/tiny/infer", json=request, headers=auth("station"))
    assert r.status_code == 400, r.text
    assert r.json() == {
        "detail": "input 'image': shape [0, 1, 8, 8] holds no elements",
        "code": "bad_infer_request",
    }
