"""Service settings: defaults < `.env` file < environment (CELLINSPECT_*), validated at start-up."""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from cellinspect.home import Home
from cellinspect.models.card import OperatingPoint
from cellinspect.models.store import parse_model_ref


class Mode(StrEnum):
    DEV = "dev"  # open by default, placeholder keys tolerated
    PRODUCTION = "production"  # refuses to start without real API keys


class Role(StrEnum):
    STATION = "station"  # line cameras: inspect
    OPERATOR = "operator"  # read records and archived images (and inspect)
    ADMIN = "admin"  # models: reload, promote (and everything else)


PLACEHOLDER_KEYS = frozenset({"", "changeme", "change-me", "secret", "key", "test", "password"})
MIN_KEY_LENGTH = 16


def _split_list(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Everything the service reads at start; see README "Serving" for the variables."""

    model_config = SettingsConfigDict(
        env_prefix="CELLINSPECT_",
        env_file=".env",
        extra="ignore",
        protected_namespaces=(),
        # A validation error would otherwise quote the input, API keys included, into
        # whatever logs the exception (uvicorn does, for an app factory that raises).
        hide_input_in_errors=True,
    )

    mode: Mode = Mode.DEV
    home: Path | None = None  # None: $CELLINSPECT_HOME or ./cellinspect-home
    store: Path | None = None  # None: HOME/store
    # Models served, each "name", "name@version" or "name@alias"; the first is the default.
    models: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["electrode-defects"])
    providers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["CPUExecutionProvider"]
    )
    intra_op_threads: int | None = Field(None, ge=1)  # None: half the cores (see ort_threads)
    # ORT workers busy-wait between runs when on; off measured faster in the service on a
    # 2-core box, where they would steal the cores decoding and the event loop need.
    ort_spin: bool = False
    # Every this many seconds, a served model whose alias moved in the store (a promotion
    # from the CLI or another worker) is reloaded; 0: only reloads through the API.
    follow_store_s: float = Field(5.0, ge=0)
    # Micro-batching: a batch closes at max_batch_size or max_delay_ms after its first image.
    max_batch_size: int = Field(8, ge=1, le=256)
    max_delay_ms: float = Field(2.0, ge=0, le=1000)
    queue_size: int = Field(64, ge=1)  # images waiting for a batch; beyond it: 503
    deadline_ms: float = Field(2000, gt=0)  # per request; past it: 503 + Retry-After
    # Decode threads; 0: decode on the event loop's thread. None: the cores this process
    # owns (`serve --workers N` sets 0 when each worker's share is one core).
    decode_workers: int | None = Field(None, ge=0)
    decode_queue_size: int = Field(64, ge=1)  # requests waiting for a decode worker; beyond: 503
    # How long an idle client connection is kept open; 5 s is uvicorn's own default. Longer
    # spares a camera that pauses between cells its reconnects, but under 2x overload 75 s
    # cut the accepted images/s by 20-30% (benchmarks/RESULTS.md, "Keep-alive"), so the
    # default stays where the recorded benchmarks ran.
    keep_alive_s: int = Field(5, ge=1, le=3600)
    # Input limits
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(40_000_000, ge=1)
    max_batch_images: int = Field(32, ge=1)
    max_frame_pixels: int = Field(100_000_000, ge=1)
    # A frame costs one inference per tile: at overlap 0.89 a frame has 100x the tiles it
    # has at 0; beyond this many the frame is refused (422) before any work.
    max_frame_tiles: int = Field(20_000, ge=1)
    # Frames decoded or being tiled at once, each up to max_frame_pixels x 8 bytes held
    # until its answer; beyond it: 503 at once.
    max_frames_in_flight: int = Field(2, ge=1)
    # Records and archive
    database_url: str | None = None  # None: SQLite under HOME; postgresql+psycopg://...
    archive_dir: Path | None = None  # None: HOME/archive
    archive_pass_sample_rate: float = Field(0.01, ge=0, le=1)
    archive_quota_bytes: int = Field(5 * 1024**3, ge=0)
    archive_retention_days: float = Field(30, gt=0)
    archive_retention_check_s: float = Field(3600, gt=0)  # retention runs at start and this often
    records_startup_wait_s: float = Field(30, ge=0)  # how long start-up waits for the database
    # Security: "station:KEY1,operator:KEY2,admin:KEY3" and/or a file of such lines.
    api_keys: SecretStr | None = None  # secret: never shown in repr, logs or errors
    api_keys_file: Path | None = None
    open_health: bool = True  # /healthz, /readyz, /v2/health/* without a key
    open_metrics: bool = True  # /metrics without a key
    # /docs, /redoc and /openapi.json (never behind a key). None: served in dev mode, not in
    # production, where they would map every route for anyone on the network.
    open_docs: bool | None = None
    # Per-line operating points, JSON: {"line-3": {"review_low": 0.2, "scrap_threshold": 0.8}}
    line_operating_points: dict[str, OperatingPoint] = Field(default_factory=dict)
    # Shadow mode, JSON: {"electrode-defects": "electrode-defects@5"}: a candidate version per
    # served model, run beside it on live images and recorded, never the answer.
    shadow_models: dict[str, str] = Field(default_factory=dict)
    # Share of inspections also run on the candidate. 0.1: on 2 cores a shadow run on every
    # idle moment still cost +1 ms p50; one in ten costs nothing measurable at one client
    # (benchmarks/RESULTS.md) and still gives a line at 1 image/s 8,640 comparisons a day.
    shadow_share: float = Field(0.1, ge=0, le=1)
    # A shadow run starts only while the served models hold at most this many live images
    # waiting plus batches running: 0 = only while they are idle.
    shadow_max_primary_queue: int = Field(0, ge=0)
    # ORT threads per candidate: 1 keeps all its work in its batcher's niced worker thread;
    # ORT's extra threads, with more, run at normal priority.
    shadow_intra_op_threads: int = Field(1, ge=1)

    @field_validator("models", "providers", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        """Environment values are "a,b,c"; YAML/JSON/kwargs may already be lists."""
        return _split_list(value)

    @model_validator(mode="after")
    def _production_needs_keys(self) -> Settings:
        if self.mode is Mode.PRODUCTION:
            keys = self.parsed_keys()
            if not keys:
                raise ValueError("production mode needs API keys (CELLINSPECT_API_KEYS or _FILE)")
            weak = [role.value for key, role in keys.items() if is_placeholder(key)]
            if weak:
                raise ValueError(
                    f"production mode refuses placeholder or short API keys (roles: {', '.join(weak)});"
                    f" use random keys of at least {MIN_KEY_LENGTH} characters"
                )
        if not self.models:
            raise ValueError("at least one model must be configured (CELLINSPECT_MODELS)")
        return self

    @model_validator(mode="after")
    def _shadow_candidates_match(self) -> Settings:
        served = [parse_model_ref(text).name for text in self.models]
        for name, candidate in self.shadow_models.items():
            if name not in served:
                raise ValueError(
                    f"shadow candidate for {name!r}, which is not served (served: {', '.join(served)})"
                )
            if parse_model_ref(candidate).name != name:
                raise ValueError(
                    f"the shadow candidate for {name!r} must be a version of it "
                    f"({name}@VERSION or {name}@ALIAS), got {candidate!r}"
                )
        return self

    @property
    def resolved_home(self) -> Home:
        return Home.resolve(self.home)

    @property
    def store_path(self) -> Path:
        return self.store or self.resolved_home.store

    @property
    def archive_path(self) -> Path:
        return self.archive_dir or self.resolved_home.archive

    @property
    def database(self) -> str:
        return self.database_url or self.resolved_home.database_url

    @property
    def cores(self) -> int:
        return len(os.sched_getaffinity(0))

    @property
    def ort_threads(self) -> int:
        """ONNX Runtime intra-op threads of a served model: `intra_op_threads`, else half the
        cores. The other half decodes, answers HTTP and writes records, which on a small
        CNN cost as much CPU as the model: on 2 cores one ORT thread gave +10-20% images/s
        at 16 clients and a lower p50 at one client than two (benchmarks/RESULTS.md), and
        a second thread without spinning cost 0.1-0.6 ms more CPU per image."""
        return self.intra_op_threads or max(1, self.cores // 2)

    def parsed_keys(self) -> dict[str, Role]:
        """API key -> role, from the variable and the file; bad entries raise ValueError."""
        entries: list[str] = []
        if self.api_keys:
            entries += self.api_keys.get_secret_value().split(",")
        if self.api_keys_file:
            try:
                text = self.api_keys_file.read_text()
            except OSError as exc:
                raise ValueError(
                    f"{self.api_keys_file}: cannot read API keys file ({exc})"
                ) from None
            entries += [line for line in text.splitlines() if not line.lstrip().startswith("#")]
        keys: dict[str, Role] = {}
        for entry in (e.strip() for e in entries):
            if not entry:
                continue
            role, sep, key = entry.partition(":")
            if not sep or not key.strip():
                raise ValueError("API keys look like role:KEY, comma-separated")
            try:
                keys[key.strip()] = Role(role.strip())
            except ValueError:
                valid = ", ".join(r.value for r in Role)
                raise ValueError(f"unknown API key role {role.strip()!r}; valid: {valid}") from None
        return keys


def is_placeholder(key: str) -> bool:
    return key.lower() in PLACEHOLDER_KEYS or len(key) < MIN_KEY_LENGTH
