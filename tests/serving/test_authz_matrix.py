"""Only the right people act: every route of the app against every identity, hostile
identifiers refused without touching files outside the store, production mode refusing to
start without real keys, and API keys never written to a log or an answer.

The routes come from the app itself, so a route added later is checked at once: it fails
`test_the_access_table_lists_every_route_of_the_app` until ACCESS says who may call it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError
from servicekit import KEYS, auth, make_settings, png, publish_tiny
from tinymodel import WEIGHTS

from cellinspect.models.store import ModelStore
from cellinspect.serving.app import create_app


class Access(StrEnum):
    """Who may call a route, as serving/routers/*.py decide it."""

    PUBLIC = "public"  # never asks for a key: FastAPI's API docs
    HEALTH = "health"  # open while open_health (the default), else operator
    METRICS = "metrics"  # open while open_metrics (the default), else operator
    STATION = "station"
    OPERATOR = "operator"
    ADMIN = "admin"


# (method, path template) -> who may call it. Every route of the app must be listed.
ACCESS: dict[tuple[str, str], Access] = {
    ("GET", "/openapi.json"): Access.PUBLIC,
    ("HEAD", "/openapi.json"): Access.PUBLIC,
    ("GET", "/docs"): Access.PUBLIC,
    ("HEAD", "/docs"): Access.PUBLIC,
    ("GET", "/docs/oauth2-redirect"): Access.PUBLIC,
    ("HEAD", "/docs/oauth2-redirect"): Access.PUBLIC,
    ("GET", "/redoc"): Access.PUBLIC,
    ("HEAD", "/redoc"): Access.PUBLIC,
    ("GET", "/healthz"): Access.HEALTH,
    ("GET", "/readyz"): Access.HEALTH,
    ("GET", "/metrics"): Access.METRICS,
    ("GET", "/v2/health/live"): Access.HEALTH,
    ("GET", "/v2/health/ready"): Access.HEALTH,
    ("POST", "/v1/inspect"): Access.STATION,
    ("POST", "/v1/inspect/batch"): Access.STATION,
    ("POST", "/v1/inspect/frame"): Access.STATION,
    ("GET", "/v1/models"): Access.STATION,
    ("GET", "/v2/models/{name}"): Access.STATION,
    ("GET", "/v2/models/{name}/ready"): Access.STATION,
    ("POST", "/v2/models/{name}/infer"): Access.STATION,
    ("GET", "/v1/inspections"): Access.OPERATOR,
    ("GET", "/v1/inspections/{inspection_id}"): Access.OPERATOR,
    ("GET", "/v1/inspections/{inspection_id}/image"): Access.OPERATOR,
    ("POST", "/v1/models/{name}/reload"): Access.ADMIN,
    ("POST", "/v1/models/{name}/promote"): Access.ADMIN,
}

# A valid request body per route that needs one, so a sufficient role gets a 2xx.
_FP32_ZEROS = [0.0] * 64
BODIES: dict[tuple[str, str], Callable[[], dict[str, Any]]] = {
    ("POST", "/v1/inspect"): lambda: {"content": png(0), "headers": {"Content-Type": "image/png"}},
    ("POST", "/v1/inspect/batch"): lambda: {"files": [("images", ("a.png", png(0), "image/png"))]},
    ("POST", "/v1/inspect/frame"): lambda: {
        "content": png(0, size=24),
        "headers": {"Content-Type": "image/png"},
    },
    ("POST", "/v2/models/{name}/infer"): lambda: {
        "json": {
            "inputs": [
                {"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": _FP32_ZEROS}
            ]
        }
    },
    # The version already served and promoted: the matrix leaves the service as it found it.
    ("POST", "/v1/models/{name}/reload"): lambda: {"json": {"version": "1"}},
    ("POST", "/v1/models/{name}/promote"): lambda: {"json": {"version": "1", "reload": False}},
}

WRONG_KEY = "wrong-key-0123456789abcdef"
ROLE_ORDER = ["station", "operator", "admin"]  # each may do what the ones before it may
IDENTITIES = ["no-key", "wrong-key", *ROLE_ORDER]


def key_headers(identity: str, *, bearer: bool) -> dict[str, str]:
    """The identity's key as `X-API-Key: KEY` or `Authorization: Bearer KEY`."""
    key = {"no-key": None, "wrong-key": WRONG_KEY, **KEYS}[identity]
    if key is None:
        return {}
    return {"Authorization": f"Bearer {key}"} if bearer else {"X-API-Key": key}


def app_routes(app: FastAPI) -> set[tuple[str, str]]:
    """Every (method, path template) the app answers, however its routers are nested."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # FastAPI < 0.137.2 copies included routes into app.routes
        routes: Any = app.routes
    else:
        routes = iter_route_contexts(app.routes)
    found = set()
    for route in routes:
        # A route without methods (a mount, a websocket) is listed as ANY, so the table
        # check fails for it instead of skipping it.
        for method in getattr(route, "methods", None) or {"ANY"}:
            found.add((method, route.path))
    return found


def needed_role(access: Access, *, open_health: bool, open_metrics: bool) -> str | None:
    """The least role a route needs under these settings; None: no key needed."""
    if access is Access.PUBLIC:
        return None
    if access is Access.HEALTH:
        return None if open_health else "operator"
    if access is Access.METRICS:
        return None if open_metrics else "operator"
    return access.value


@dataclass
class Served:
    client: TestClient
    home: Path
    inspection_id: str  # a recorded inspection with an archived image
    open_health: bool
    open_metrics: bool
    bearer: bool  # how this service's callers send their keys

    def url(self, path: str) -> str:
        """The path template with valid values for an existing model and inspection."""
        values = {"name": "tiny", "inspection_id": self.inspection_id}
        try:
            return path.format(**values)
        except KeyError as exc:
            pytest.fail(f"{path}: add a valid value for path parameter {exc} to Served.url")

    def request(self, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
        kwargs = BODIES.get((method, path), dict)()
        kwargs["headers"] = {**kwargs.get("headers", {}), **headers}
        return self.client.request(method, self.url(path), **kwargs)


def _home(root: Path) -> Path:
    store = ModelStore(root / "store")
    publish_tiny(store, root)  # tiny@1
    publish_tiny(store, root, weights=WEIGHTS * 2)  # tiny@2
    store.promote("tiny", "1")
    return root


def _archived_inspection(client: TestClient) -> str:
    r = client.post(
        "/v1/inspect", content=png(255), headers={"Content-Type": "image/png", **auth("station")}
    )
    assert r.status_code == 200 and r.json()["verdict"] == "scrap", r.text
    return r.json()["inspection_id"]


@pytest.fixture(
    scope="module",
    params=[False, True],
    ids=["defaults-x-api-key", "health-and-metrics-locked-bearer"],
)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """The service with default settings, keys sent as X-API-Key; or with health and
    metrics behind a key (open_health=open_metrics=False), keys sent as Bearer tokens."""
    locked = request.param
    home = _home(tmp_path_factory.mktemp("authz"))
    settings = make_settings(home, open_health=not locked, open_metrics=not locked)
    with TestClient(create_app(settings)) as client:
        inspection_id = _archived_inspection(client)
        yield Served(client, home, inspection_id, not locked, not locked, bearer=locked)


def test_the_access_table_lists_every_route_of_the_app(served: Served) -> None:
    routes = app_routes(served.client.app)  # type: ignore[arg-type]
    # Guards against an enumeration that silently finds nothing (as app.routes alone would
    # on FastAPI >= 0.137, where included routers are not flattened).
    assert ("POST", "/v1/models/{name}/reload") in routes and len(routes) >= len(ACCESS)
    unlisted = sorted(routes - ACCESS.keys())
    assert not unlisted, f"routes with no entry in ACCESS (say who may call them): {unlisted}"
    gone = sorted(ACCESS.keys() - routes)
    assert not gone, f"ACCESS lists routes the app no longer has: {gone}"


@pytest.mark.parametrize("identity", IDENTITIES)
def test_every_route_answers_each_identity_as_the_table_says(served: Served, identity: str) -> None:
    headers = key_headers(identity, bearer=served.bearer)
    wrong: list[str] = []
    checked = 0
    for method, path in sorted(app_routes(served.client.app)):  # type: ignore[arg-type]
        access = ACCESS.get((method, path))
        if access is None:
            wrong.append(f"{method} {path}: not in ACCESS")
            continue
        needed = needed_role(
            access, open_health=served.open_health, open_metrics=served.open_metrics
        )
        r = served.request(method, path, headers)
        checked += 1
        where = f"{method} {path} as {identity} (needs {needed or 'nothing'}): {r.status_code}"
        if needed is None or (
            identity in ROLE_ORDER and ROLE_ORDER.index(identity) >= ROLE_ORDER.index(needed)
        ):
            if not 200 <= r.status_code < 300:
                wrong.append(f"{where}, expected 2xx: {r.text[:200]}")
        elif identity not in ROLE_ORDER:
            if r.status_code != 401:
                wrong.append(f"{where}, expected 401")
            elif r.headers.get("WWW-Authenticate") != "Bearer" or "API key" not in r.text:
                wrong.append(f"{where}: a 401 must say what to send: {r.text[:200]}")
        elif r.status_code != 403:
            wrong.append(f"{where}, expected 403")
        elif f"({identity})" not in r.text or f"needs {needed}" not in r.text:
            wrong.append(f"{where}: a 403 must name the role and the one needed: {r.text}")
    assert checked == len(ACCESS), f"checked {checked} routes, ACCESS lists {len(ACCESS)}"
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {KEYS['admin']}"},
        {"Authorization": f"bearer  {KEYS['admin']} "},
        {"X-API-Key": f" {KEYS['admin']} "},
    ],
    ids=["bearer", "bearer-lower-case-and-spaces", "x-api-key-with-spaces"],
)
def test_both_documented_ways_of_sending_a_key_work(served: Served, headers: dict) -> None:
    r = served.request("POST", "/v1/models/{name}/reload", headers)
    assert r.status_code == 200, r.text


ADMIN_KEY = KEYS["admin"]


@pytest.mark.parametrize(
    "headers",
    [
        {"X-API-Key": ADMIN_KEY[:-1]},
        {"X-API-Key": ADMIN_KEY + "x"},
        {"X-API-Key": ADMIN_KEY.upper()},
        {"X-API-Key": ADMIN_KEY[:8]},
        {"X-API-Key": f"{KEYS['station']},{ADMIN_KEY}"},
        {"X-API-Key": f"admin:{ADMIN_KEY}"},
        {"Authorization": f"Basic {ADMIN_KEY}"},
        {"Authorization": ADMIN_KEY},
        {"Authorization": "Bearer "},
        {"X-Api-Key-Admin": ADMIN_KEY},
    ],
    ids=[
        "truncated",
        "extended",
        "upper-case",
        "prefix",
        "two-keys",
        "with-role-prefix",
        "basic-scheme",
        "no-scheme",
        "empty-bearer",
        "other-header",
    ],
)
def test_near_miss_keys_are_refused(served: Served, headers: dict) -> None:
    r = served.request("POST", "/v1/models/{name}/reload", headers)
    assert r.status_code == 401, r.text
    assert ADMIN_KEY not in r.text


def test_a_key_in_the_query_string_is_not_accepted(served: Served) -> None:
    # Query strings end up in proxy and access logs: keys travel in headers only.
    r = served.client.post("/v1/models/tiny/reload", params={"api_key": ADMIN_KEY})
    assert r.status_code == 401


# ---- hostile identifiers --------------------------------------------------------------

HOSTILE = {
    "dotdot": "../..",
    "dotdot-deep": "../../../../../../etc/passwd",
    "dotdot-store": "../../inspections.sqlite3",
    "encoded-dotdot": "%2e%2e%2f%2e%2e%2f",
    "double-encoded": "%252e%252e%252f",
    "backslash": "..\\..\\windows\\win.ini",
    "absolute": "/etc/passwd",
    "10k-chars": "a" * 10_000,
    "nul": "tiny\x00",
    "nul-middle": "ti\x00ny",
    "sql": "tiny' OR '1'='1'; DROP TABLE inspections;--",
    "shell": "tiny;touch /tmp/cellinspect-pwned`id`$(id)|id&",
    "crlf": "tiny\r\nX-Injected: 1",
    "unicode-digit": "\u00b2",
    "fullwidth-dotdot": "\uff0e\uff0e\uff0f",
}


@dataclass(frozen=True)
class Target:
    role: str
    build: Callable[[str], dict[str, Any]]  # hostile value -> client.request kwargs


def _path(method: str, template: str, **kwargs: Any) -> Callable[[str], dict[str, Any]]:
    def build(value: str) -> dict[str, Any]:
        fields = {"name": "tiny", "inspection_id": "0" * 32}
        key = "name" if "{name}" in template else "inspection_id"
        # Percent-encoded so the value reaches the route whole, '/' and '%' included.
        fields[key] = quote(value, safe="")
        return {"method": method, "url": template.format(**fields), **kwargs}

    return build


def _image(**params: str) -> dict[str, Any]:
    return {
        "method": "POST",
        "url": "/v1/inspect",
        "content": png(0),
        "headers": {"Content-Type": "image/png"},
        "params": params,
    }


TARGETS: dict[str, Target] = {
    "reload-name": Target("admin", _path("POST", "/v1/models/{name}/reload", json={})),
    "promote-name": Target(
        "admin", _path("POST", "/v1/models/{name}/promote", json={"version": "1"})
    ),
    "v2-metadata-name": Target("station", _path("GET", "/v2/models/{name}")),
    "v2-ready-name": Target("station", _path("GET", "/v2/models/{name}/ready")),
    "v2-infer-name": Target(
        "station", _path("POST", "/v2/models/{name}/infer", json={"inputs": []})
    ),
    "inspection-id": Target("operator", _path("GET", "/v1/inspections/{inspection_id}")),
    "inspection-image-id": Target(
        "operator", _path("GET", "/v1/inspections/{inspection_id}/image")
    ),
    "reload-version": Target(
        "admin",
        lambda v: {"method": "POST", "url": "/v1/models/tiny/reload", "json": {"version": v}},
    ),
    "promote-version": Target(
        "admin",
        lambda v: {"method": "POST", "url": "/v1/models/tiny/promote", "json": {"version": v}},
    ),
    "promote-alias": Target(
        "admin",
        lambda v: {
            "method": "POST",
            "url": "/v1/models/tiny/promote",
            "json": {"version": "2", "alias": v},
        },
    ),
    "inspect-model": Target("station", lambda v: _image(model=v)),
    "inspect-model-version": Target("station", lambda v: _image(model=f"tiny@{v}")),
    "inspect-cell-id": Target("station", lambda v: _image(cell_id=v)),
    "list-line-id": Target(
        "operator", lambda v: {"method": "GET", "url": "/v1/inspections", "params": {"line_id": v}}
    ),
}

# The same attacks written straight into the URL, for the server (not the client) to decode.
RAW_URLS = [
    ("POST", "/v1/models/%2e%2e%2f%2e%2e%2fetc/reload", "admin"),
    ("POST", "/v1/models/..%2f..%2fstore/promote", "admin"),
    ("POST", "/v1/models/tiny%00/reload", "admin"),
    ("POST", "/v1/models/..%5c..%5cstore/reload", "admin"),
    ("GET", "/v2/models/%2e%2e/ready", "station"),
    ("GET", "/v1/inspections/..%2f..%2finspections.sqlite3/image", "operator"),
    ("GET", "/v1/inspections/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd", "operator"),
]

# Audit events that read, write, list or remove files (os.stat has none; reads are opens).
_FILE_EVENTS = frozenset(
    {
        "open",
        "os.listdir",
        "os.scandir",
        "os.mkdir",
        "os.rename",
        "os.remove",
        "os.rmdir",
        "os.truncate",
        "os.chmod",
        "os.utime",
        "os.symlink",
        "os.link",
        "shutil.copyfile",
        "shutil.rmtree",
    }
)
_recording: list[FileEvent] | None = None
_hook_installed = False


@dataclass(frozen=True)
class FileEvent:
    event: str
    path: str
    modifies: bool  # creates, writes, renames or removes (not a read or a listing)


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _recording is None or event not in _FILE_EVENTS:
        return
    # open: (path, mode, flags); the others: their path argument(s) first.
    paths = args[:1] if event == "open" else args[:2]
    if event == "open":
        modifies = bool(args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))
    else:
        modifies = event not in ("os.listdir", "os.scandir")
    for arg in paths:
        if isinstance(arg, str | bytes | Path):
            path = arg.decode(errors="replace") if isinstance(arg, bytes) else str(arg)
            _recording.append(FileEvent(event, path, modifies))


@pytest.fixture
def file_access() -> Iterator[list[FileEvent]]:
    """Every file the process opens, lists, writes or removes while the test runs."""
    global _recording, _hook_installed
    if not _hook_installed:  # audit hooks cannot be removed: one, switched on and off
        sys.addaudithook(_audit)
        _hook_installed = True
    _recording = []
    try:
        yield _recording
    finally:
        _recording = None


def _code_dirs() -> set[Path]:
    """Where Python code lives: the interpreter's and this project's packages."""
    dirs = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix)}
    for name, module in list(sys.modules.items()):
        if name.startswith("cellinspect") and getattr(module, "__file__", None):
            dirs.add(Path(module.__file__).resolve().parent)
    return dirs


def outside_the_store(events: list[FileEvent], home: Path) -> list[FileEvent]:
    """Events on files that are not the service's own data (store, archive, records
    database), nor code being read (FastAPI reads an endpoint's source to report a
    validation error) or the runtime's /proc, /sys and /dev."""
    own = [home / "store", home / "archive"]
    code = _code_dirs()
    runtime = [Path("/proc"), Path("/sys"), Path("/dev")]
    found = []
    for e in events:
        resolved = Path(e.path).resolve()
        if any(resolved.is_relative_to(p) for p in [*own, *runtime]):
            continue
        if resolved.parent == home and resolved.name.startswith("inspections.sqlite3"):
            continue
        if not e.modifies and any(resolved.is_relative_to(p) for p in code):
            continue
        found.append(e)
    return found


def _assert_refused_clearly(r: httpx.Response, what: str) -> None:
    assert 400 <= r.status_code < 500, f"{what}: {r.status_code} {r.text[:300]}"
    assert r.status_code not in (401, 403), f"{what}: refused for the key, not the value"
    detail = r.json()["detail"]
    if isinstance(detail, list):  # FastAPI's validation errors: one message per field
        assert detail and all(item["msg"] for item in detail), f"{what}: {detail}"
    else:
        assert detail.strip(), f"{what}: empty detail"
        # Says what is wrong with the value, not what went wrong inside Python.
        internals = ("invalid literal", "Traceback", "Errno", "has no attribute", "NoneType")
        assert not any(word in detail for word in internals), f"{what}: {detail}"


@pytest.fixture(scope="module")
def hostile_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Path]]:
    home = _home(tmp_path_factory.mktemp("hostile"))
    # Files a traversal could reach: beside the store, and one level above the home.
    (home / "secret.onnx").write_bytes(b"outside the store")
    (home.parent / "card.json").write_text("{}")
    with TestClient(create_app(make_settings(home))) as client:
        yield client, home


@pytest.mark.parametrize("target", list(TARGETS))
def test_hostile_identifiers_are_refused_with_a_4xx_and_touch_no_file_outside_the_store(
    hostile_client: tuple[TestClient, Path], file_access: list[FileEvent], target: str
) -> None:
    client, home = hostile_client
    spec = TARGETS[target]
    for label, value in HOSTILE.items():
        kwargs = spec.build(value)
        kwargs["headers"] = {**kwargs.get("headers", {}), **auth(spec.role)}
        r = client.request(**kwargs)
        _assert_refused_clearly(r, f"{target} = {label}")
        # The answer may quote the value back (JSON-escaped), but is never amplified.
        assert len(r.content) < 2_000 + 6 * len(value), f"{target} = {label}: {len(r.content)}"
    outside = outside_the_store(file_access, home)
    assert not outside, f"touched files outside the service's data: {outside}"
    # Still serving, nothing moved, records intact.
    image = _image()
    image["headers"] = {**image["headers"], **auth("station")}
    assert client.request(**image).status_code == 200
    assert ModelStore(home / "store").aliases("tiny") == {"production": "1"}
    assert client.get("/v1/inspections", headers=auth("operator")).status_code == 200


@pytest.mark.parametrize(("method", "url", "role"), RAW_URLS)
def test_encoded_traversal_in_the_raw_url_is_refused(
    hostile_client: tuple[TestClient, Path],
    file_access: list[FileEvent],
    method: str,
    url: str,
    role: str,
) -> None:
    client, home = hostile_client
    r = client.request(method, url, headers=auth(role), json={"version": "1"})
    _assert_refused_clearly(r, f"{method} {url}")
    outside = outside_the_store(file_access, home)
    assert not outside, f"touched files outside the service's data: {outside}"


@pytest.mark.parametrize(
    "length",
    [b"9" * 10_000, b"-1", b"1e3", b"0x10", b" 12", b"\xb2", b"99999999999999999999999"],
    ids=["10k-digits", "negative", "exponent", "hex", "space", "superscript-two", "huge"],
)
def test_a_hostile_binary_header_length_is_a_400(
    hostile_client: tuple[TestClient, Path], length: bytes
) -> None:
    client, _ = hostile_client
    # Raw header bytes: httpx would refuse to send some of these from a str.
    headers = [
        (b"Inference-Header-Content-Length", length),
        (b"X-API-Key", KEYS["station"].encode()),
    ]
    r = client.post("/v2/models/tiny/infer", content=b'{"inputs": []}', headers=headers)
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "bad_infer_request"
    assert "inference-header-content-length" in r.json()["detail"].lower()


# ---- production mode --------------------------------------------------------------------


STRONG = {role: f"{role}-{'k' * 20}-{i}" for i, role in enumerate(ROLE_ORDER)}


def _keys(**keys: str) -> str:
    return ",".join(f"{role}:{key}" for role, key in keys.items())


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({}, "production mode needs API keys"),
        ({"api_keys": ""}, "production mode needs API keys"),
        ({"api_keys": _keys(**{**STRONG, "station": "changeme"})}, r"placeholder.*station"),
        ({"api_keys": _keys(**{**STRONG, "operator": "short-key"})}, r"short.*operator"),
        ({"api_keys": f"root:{STRONG['admin']}"}, r"unknown API key role 'root'; valid: station"),
        ({"api_keys": STRONG["admin"]}, r"API keys look like role:KEY"),
    ],
    ids=["no-keys", "empty-keys", "placeholder", "too-short", "unknown-role", "no-role"],
)
def test_production_mode_refuses_to_start_without_real_keys(
    home: Path, monkeypatch: pytest.MonkeyPatch, fields: dict, reason: str
) -> None:
    for name in ("CELLINSPECT_API_KEYS", "CELLINSPECT_API_KEYS_FILE", "CELLINSPECT_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(home)  # no stray .env
    with pytest.raises(ValidationError, match=reason) as info:
        make_settings(home, mode="production", **{"api_keys": None, **fields})
    text = str(info.value)
    for key in [*STRONG.values(), "changeme", "short-key"]:
        assert key not in text, f"the settings error shows an API key: {text}"
    # Nor any long piece of one (a truncated repr of the input would show the last key's tail).
    for key in STRONG.values():
        assert key[-12:] not in text, f"the settings error shows part of an API key: {text}"


def test_production_mode_refuses_a_keys_file_with_a_placeholder(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CELLINSPECT_API_KEYS", raising=False)
    keys_file = home / "keys.txt"
    keys_file.write_text(f"# line keys\n{_keys(station=STRONG['station'])}\nadmin:secret\n")
    with pytest.raises(ValidationError, match=r"placeholder.*admin") as info:
        make_settings(home, mode="production", api_keys=None, api_keys_file=keys_file)
    assert STRONG["station"] not in str(info.value) and "secret\n" not in str(info.value)


def test_production_mode_from_the_environment_without_keys_refuses(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cellinspect.serving.settings import Settings

    monkeypatch.chdir(home)
    monkeypatch.setenv("CELLINSPECT_MODE", "production")
    monkeypatch.delenv("CELLINSPECT_API_KEYS", raising=False)
    monkeypatch.delenv("CELLINSPECT_API_KEYS_FILE", raising=False)
    with pytest.raises(ValidationError, match="production mode needs API keys"):
        Settings(home=home, models=["tiny"])
    with pytest.raises(ValidationError, match="production mode needs API keys"):
        create_app()


def test_production_mode_with_real_keys_starts_closed(home: Path) -> None:
    settings = make_settings(home, mode="production", api_keys=_keys(**STRONG))
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/models").status_code == 401
        r = client.get("/v1/models", headers={"X-API-Key": STRONG["station"]})
        assert r.status_code == 200 and r.json()[0]["name"] == "tiny"
        # No map of the routes for anyone on the network; a key does not open them either.
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == 404
            assert client.get(path, headers={"X-API-Key": STRONG["admin"]}).status_code == 404


@pytest.mark.parametrize(("mode", "open_docs", "served"), [
    ("dev", None, True), ("dev", False, False), ("production", True, True),
])  # fmt: skip
def test_api_docs_follow_the_mode_unless_set(
    home: Path, mode: str, open_docs: bool | None, served: bool
) -> None:
    settings = make_settings(home, mode=mode, api_keys=_keys(**STRONG), open_docs=open_docs)
    with TestClient(create_app(settings)) as client:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert (client.get(path).status_code == 200) is served


# ---- keys never logged or echoed ----------------------------------------------------------


@pytest.fixture
def all_logs_at_debug(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog at DEBUG for every logger, including ones that do not propagate to the root."""
    caplog.set_level(logging.DEBUG)
    detached = []
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger):
            continue
        caplog.set_level(logging.DEBUG, logger=name)
        if not logger.propagate:
            logger.addHandler(caplog.handler)
            detached.append(logger)
    try:
        yield caplog
    finally:
        for logger in detached:
            logger.removeHandler(caplog.handler)


def test_api_keys_never_appear_in_logs_or_answers(
    home: Path, all_logs_at_debug: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture
) -> None:
    near_misses = [KEYS["admin"][:-1], KEYS["operator"] + "0", "Bearer-" + KEYS["station"]]
    secrets = [*KEYS.values(), WRONG_KEY, *near_misses]
    answers: list[str] = []
    with TestClient(create_app(make_settings(home))) as client:
        inspection_id = _archived_inspection(client)
        served = Served(client, home, inspection_id, True, True, bearer=False)
        presented = [
            *(key_headers(identity, bearer=False) for identity in IDENTITIES),
            *({"X-API-Key": key} for key in near_misses),
            *({"Authorization": f"Bearer {key}"} for key in [*KEYS.values(), *near_misses]),
        ]
        for method, path in sorted(app_routes(client.app)):  # type: ignore[arg-type]
            for headers in presented:
                r = served.request(method, path, headers)
                answers.append(f"{r.status_code} {r.headers} {r.text}")
        # Failures log too: a refused reload, a request that fails validation.
        for headers in (auth("admin"), {"X-API-Key": WRONG_KEY}):
            r = client.post("/v1/models/tiny/reload", json={"version": "99"}, headers=headers)
            answers.append(r.text)
            r = client.post("/v1/inspect", content=b"junk", headers=headers)
            answers.append(r.text)
    out, err = capfd.readouterr()
    logged = all_logs_at_debug.text + "\n".join(
        f"{r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in all_logs_at_debug.records
    )
    assert len(all_logs_at_debug.records) > 10, "nothing was logged: the test would prove nothing"
    for secret in secrets:
        assert secret not in logged, f"an API key was logged: ...{secret[-6:]}"
        assert secret not in out + err, f"an API key was printed: ...{secret[-6:]}"
        leaked = [a[:200] for a in answers if secret in a]
        assert not leaked, f"an API key was echoed in an answer: {leaked}"


def test_settings_never_show_their_keys(home: Path) -> None:
    settings = make_settings(home)
    shown = [repr(settings), str(settings), settings.model_dump_json(), str(settings.model_dump())]
    for key in KEYS.values():
        assert all(key not in text for text in shown)
