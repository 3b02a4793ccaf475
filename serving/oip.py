"""Open Inference Protocol v2 codec: JSON bodies and Triton's binary tensor extension.

Hand-written because no maintained library decodes these bodies without pulling in a whole
inference server: the format is a JSON header optionally followed by raw tensor bytes
(`Inference-Header-Content-Length`), which tritonclient uses by default.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cellinspect.serving.errors import RequestError

HEADER_LENGTH = "inference-header-content-length"
MAX_DIMS = 8  # tensor rank; a longer shape list is refused before its product is taken
DTYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "UINT8": np.uint8}


@dataclass
class InferInput:
    name: str
    datatype: str
    shape: list[int]
    array: np.ndarray | None = None  # numeric tensors
    items: list[bytes] = field(default_factory=list)  # BYTES tensors


@dataclass
class InferRequest:
    id: str | None
    inputs: list[InferInput]
    binary_outputs: dict[str, bool]  # requested output name -> wants binary


def _bad(detail: str) -> RequestError:
    return RequestError(400, "bad_infer_request", detail)


def _split_bytes(raw: bytes) -> list[bytes]:
    """BYTES tensor in binary form: each element is a 4-byte little-endian length + bytes."""
    items, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise _bad("BYTES tensor data is truncated")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise _bad("BYTES tensor element runs past the data")
        items.append(raw[pos : pos + n])
        pos += n
    return items


def parse_infer_request(body: bytes, header_length: str | None, max_elements: int) -> InferRequest:
    if header_length is not None:
        # Bounded before int(): Python refuses to parse more than 4300 digits (ValueError, a 500).
        digits = header_length.isascii() and header_length.isdigit() and len(header_length) <= 20
        if not digits or int(header_length) > len(body):
            raise _bad(f"{HEADER_LENGTH} must be the JSON header's length in bytes")
        head, tail = body[: int(header_length)], body[int(header_length) :]
    else:
        head, tail = body, b""
    try:
        doc = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(f"request is not valid JSON ({exc.__class__.__name__})") from None
    except ValueError:  # json parses integers of over 4300 digits, then int() refuses them
        raise _bad("request has a number of more than 4300 digits") from None
    except RecursionError:
        raise _bad("request JSON is nested too deeply") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise _bad("request needs a non-empty 'inputs' list")
    inputs, offset = [], 0
    for spec in doc["inputs"]:
        if not isinstance(spec, dict):
            raise _bad("each input must be an object")
        name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
        if (
            not isinstance(name, str)
            or not isinstance(datatype, str)
            or not isinstance(shape, list)
        ):
            raise _bad("each input needs 'name', 'datatype' and 'shape'")
        if len(shape) > MAX_DIMS or not all(
            type(d) is int and 0 <= d <= max_elements for d in shape
        ):
            raise _bad(f"input {name!r}: shape must be at most {MAX_DIMS} non-negative integers")
        # math.prod on Python ints: numpy's int64 product wraps around to small or zero.
        count = math.prod(shape)
        if count == 0:
            raise _bad(f"input {name!r}: shape {shape} holds no elements")
        if count > max_elements:
            raise _bad(f"input {name!r}: {count} elements exceed the limit of {max_elements}")
        params = spec.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        raw = None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(tail):
                raise _bad(f"input {name!r}: binary_data_size does not fit the body")
            raw, offset = tail[offset : offset + size], offset + size
        item = InferInput(name=name, datatype=datatype, shape=shape)
        if datatype == "BYTES":
            if raw is not None:
                item.items = _split_bytes(raw)
            else:
                data = spec.get("data")
                if not isinstance(data, list) or not all(
                    isinstance(d, str) for d in _flatten(data)
                ):
                    raise _bad(f"input {name!r}: BYTES data must be base64 strings")
                try:
                    item.items = [base64.b64decode(d, validate=True) for d in _flatten(data)]
                except ValueError:
                    raise _bad(f"input {name!r}: BYTES data must be base64 strings") from None
            if len(item.items) != count:
                raise _bad(f"input {name!r}: {len(item.items)} elements for shape {shape}")
        elif datatype in DTYPES:
            dtype = DTYPES[datatype]
            try:
                if raw is not None:
                    array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
                else:
                    array = np.asarray(_flatten(spec.get("data", [])), dtype=dtype)
            except (TypeError, ValueError):
                raise _bad(f"input {name!r}: data is not {datatype} numbers") from None
            if array.size != count:
                raise _bad(f"input {name!r}: {array.size} values for shape {shape}")
            item.array = array.reshape(shape).astype(np.float32)
        else:
            valid = ", ".join([*DTYPES, "BYTES"])
            raise _bad(f"input {name!r}: datatype {datatype!r} not supported; use one of {valid}")
        inputs.append(item)
    wanted = {}
    for out in doc.get("outputs") or []:
        if isinstance(out, dict) and isinstance(out.get("name"), str):
            params = out.get("parameters") or {}
            wanted[out["name"]] = bool(isinstance(params, dict) and params.get("binary_data"))
    request_id = doc.get("id")
    return InferRequest(
        id=str(request_id) if request_id is not None else None, inputs=inputs, binary_outputs=wanted
    )


def _flatten(data: Any) -> list[Any]:
    """Nested lists -> their leaves in order; iterative, as JSON nesting may be deep."""
    out: list[Any] = []
    stack = [iter([data])]
    while stack:
        for d in stack[-1]:
            if isinstance(d, list):
                stack.append(iter(d))
                break
            out.append(d)
        else:
            stack.pop()
    return out


def encode_infer_response(
    *,
    model: str,
    version: str,
    request_id: str | None,
    outputs: dict[str, np.ndarray | list[str]],
    binary: dict[str, bool],
) -> tuple[bytes, dict[str, str]]:
    """JSON response, or JSON header + binary tensors for outputs the client asked as binary."""
    head: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": []}
    if request_id is not None:
        head["id"] = request_id
    blobs: list[bytes] = []
    for name, value in outputs.items():
        if binary and name not in binary:
            continue  # the client named its outputs: send only those
        if isinstance(value, list):
            entry: dict[str, Any] = {"name": name, "datatype": "BYTES", "shape": [len(value)]}
            if binary.get(name):
                blob = b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in value)
                entry["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                entry["data"] = value
        else:
            entry = {"name": name, "datatype": "FP32", "shape": list(value.shape)}
            if binary.get(name):
                blob = value.astype("<f4").tobytes()
                entry["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                entry["data"] = value.astype(np.float32).ravel().tolist()
        head["outputs"].append(entry)
    header = json.dumps(head).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {
        "content-type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
