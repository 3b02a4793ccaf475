"""Schemathesis against the service's own OpenAPI, in process (ASGI), as every role.

Every operation gets generated requests, valid (positive) and invalid (negative) by its
schema, and each one is sent with each role's API key and with none. No answer may be a
5xx, and answers must match the schema: content type, body and declared headers. Whether
a status code is documented is not checked: the routes' 401/403/404/413/415/503 are
described in their messages, not in the OpenAPI document.

Hypothesis is driven directly rather than through schemathesis's pytest plugin, whose
lazy schema fixture does not run under pytest 9.

    pip install -e '.[fuzz]'
    pytest -m slow tests/serving/test_schemathesis.py -s          # ~2,200 cases, ~1 min
    CELLINSPECT_SCHEMATHESIS_EXAMPLES=1000 pytest -m slow tests/serving/test_schemathesis.py -s
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="the fuzz extra is not installed")

from fastapi import FastAPI  # noqa: E402  (after the skip)
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
)
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.python.asgi import shutdown_lifespans  # noqa: E402
from servicekit import KEYS, make_settings, publish_tiny  # noqa: E402

from cellinspect.models.store import ModelStore  # noqa: E402
from cellinspect.serving.app import create_app  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

EXAMPLES = int(os.environ.get("CELLINSPECT_SCHEMATHESIS_EXAMPLES", "80"))  # per operation and mode
MIN_CASES = 2_000  # generated cases over all operations (each sent as every role)
ROLES = ("station", "operator", "admin", "anonymous")
CHECKS = [
    not_a_server_error,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@dataclass
class FuzzReport:
    cases: Counter[str] = field(default_factory=Counter)  # operation -> generated cases
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # (operation, role)
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    no_negative: list[str] = field(default_factory=list)  # operations with nothing to break
    seen: set[tuple[str, str, int]] = field(default_factory=set)  # (operation, check, status)


def fuzz_api(app: FastAPI, *, examples: int) -> FuzzReport:
    """Generated requests to every operation of `app`'s OpenAPI, each sent as every role."""
    report = FuzzReport()
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    for result in schema.get_all_operations():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz_operation(result.ok(), mode, examples, report)
    return report


def fuzz_operation(
    operation: schemathesis.APIOperation, mode: GenerationMode, examples: int, report: FuzzReport
) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        phases=[Phase.generate],  # every failure is collected, none shrunk
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def send_as_every_role(case: schemathesis.Case) -> None:
        report.cases[operation.label] += 1
        for role in ROLES:
            headers = {} if role == "anonymous" else {"X-API-Key": KEYS[role]}
            report.requests[(operation.label, role)] += 1
            response = case.call(headers=headers)
            report.statuses[response.status_code] += 1
            try:
                case.validate_response(response, checks=CHECKS, headers=headers)
            except FailureGroup as exc:  # the checks that failed: one report per kind
                for failure in exc.exceptions:
                    key = (operation.label, type(failure).__name__, response.status_code)
                    if key not in report.seen:
                        report.seen.add(key)
                        report.failures.append(
                            f"{operation.label} [{mode.value}, {role}] -> "
                            f"{response.status_code}: {failure.title}: {failure.message[:300]}\n"
                            f"  {case.as_curl_command(headers=headers)[:400]}"
                        )

    try:
        send_as_every_role()
    except Unsatisfiable:  # nothing in the operation can be made invalid (no parameters)
        report.no_negative.append(operation.label)


def test_generated_requests_get_no_5xx_and_match_the_schema(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    publish_tiny(store, tmp_path)
    publish_tiny(store, tmp_path)
    store.promote("tiny", "1")
    app = create_app(make_settings(tmp_path))
    try:
        report = fuzz_api(app, examples=EXAMPLES)
    finally:
        shutdown_lifespans()  # schemathesis started the app's lifespan on its first call
    cases, requests = sum(report.cases.values()), sum(report.requests.values())
    print(
        f"\nschemathesis: {cases} cases to {len(report.cases)} operations, {requests} requests"
        f" as {len(ROLES)} roles; statuses {dict(sorted(report.statuses.items()))};"
        f" {len(report.failures)} failures; no negative cases for {len(report.no_negative)}"
    )
    for operation, count in sorted(report.cases.items()):
        print(f"  {count:5d}  {operation}")
    for failure in report.failures:
        print(failure)
    assert report.failures == []
    documented = {
        f"{method.upper()} {path}" for path, ops in app.openapi()["paths"].items() for method in ops
    }
    assert set(report.cases) == documented
    assert {role for _, role in report.requests} == set(ROLES)
    if EXAMPLES >= 80:
        assert cases >= MIN_CASES
