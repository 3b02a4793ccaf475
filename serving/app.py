"""The app factory: wires settings, models, records, archive and routes; nothing at import time."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from cellinspect import __version__
from cellinspect.models.store import ModelStore
from cellinspect.serving.archive import ImageArchive
from cellinspect.serving.auth import ApiKeyAuth
from cellinspect.serving.engine import DecodePool, ModelRegistry
from cellinspect.serving.errors import install_error_handlers
from cellinspect.serving.gate import RequestGate
from cellinspect.serving.limits import BodySizeLimit
from cellinspect.serving.metrics import BatcherStats, ServiceMetrics
from cellinspect.serving.records import RecordStore
from cellinspect.serving.routers import health, inspect, inspections, models, v2
from cellinspect.serving.service import Service
from cellinspect.serving.settings import Mode, Settings
from cellinspect.serving.shadow import ShadowRunner

log = logging.getLogger(__name__)


def _build_service(settings: Settings) -> Service:
    metrics = ServiceMetrics()
    store = ModelStore(settings.store_path)
    records = RecordStore(
        settings.database,
        on_commit=metrics.observe_commit,
        startup_wait_s=settings.records_startup_wait_s,
    )
    registry = ModelRegistry(store, settings)
    return Service(
        settings=settings,
        store=store,
        registry=registry,
        records=records,
        archive=ImageArchive(
            settings.archive_path,
            pass_sample_rate=settings.archive_pass_sample_rate,
            quota_bytes=settings.archive_quota_bytes,
            retention_days=settings.archive_retention_days,
        ),
        decoder=DecodePool(
            settings.cores if settings.decode_workers is None else settings.decode_workers,
            max_waiting=settings.decode_queue_size,
            max_frames=settings.max_frames_in_flight,
        ),
        auth=ApiKeyAuth(settings),
        metrics=metrics,
        shadow=ShadowRunner(settings, registry, records, metrics),
    )


async def _enforce_retention(archive: ImageArchive, every_s: float) -> None:
    """Apply the archive's retention now and then every `every_s`, for the service's life."""
    while True:
        try:
            await asyncio.to_thread(archive.enforce_retention)
        except OSError as exc:  # a full or failing disk must not end the schedule
            log.error("archive: retention failed: %s", exc)
        await asyncio.sleep(every_s)


async def _sync_metrics(metrics: ServiceMetrics, every_s: float = 1.0) -> None:
    while True:
        await asyncio.sleep(every_s)
        metrics.sync()


_frozen = False


def _freeze_startup_objects() -> None:
    """Move everything alive after start-up out of the cyclic collector's reach, once.

    Modules, FastAPI's routes and pydantic's schemas live as long as the process, yet every
    full collection walks them all: under load one ran every ~6 s and stopped every thread
    needing the GIL for 40-100 ms, each time finding nothing to free (benchmarks/RESULTS.md).
    Frozen, they are skipped. Only once per process: a test process that builds many apps
    must not freeze each test's leftovers.
    """
    global _frozen
    if not _frozen:
        _frozen = True
        gc.collect()
        gc.freeze()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    service = _build_service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.records.start()
        await service.registry.load_all()  # loads, verifies and warms before /readyz says yes
        service.publish_served()
        service.metrics.watch_batchers(
            lambda: {
                e.name: BatcherStats(
                    e.batcher.queue_depth,
                    e.batcher.items_run,
                    e.batcher.batches_run,
                    batcher=id(e.batcher),
                )
                for e in service.registry.list()
            }
        )
        log.info("serving %s", ", ".join(f"{e.name}@{e.version}" for e in service.registry.list()))
        _freeze_startup_objects()
        loop = asyncio.get_running_loop()
        background = [
            loop.create_task(
                _enforce_retention(service.archive, settings.archive_retention_check_s),
                name="archive-retention",
            )
        ]
        if settings.follow_store_s > 0:
            background.append(
                loop.create_task(
                    service.registry.follow_store(
                        settings.follow_store_s, on_reload=service.publish_served
                    ),
                    name="follow-store",
                )
            )
        if service.metrics.multiprocess:  # other workers' scrapes read this one's files
            background.append(loop.create_task(_sync_metrics(service.metrics), name="metrics"))
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            service.metrics.process_exiting()
            await service.shadow.close()
            await service.registry.close()
            await service.records.close()
            service.decoder.close()

    docs = settings.open_docs if settings.open_docs is not None else settings.mode is Mode.DEV
    app = FastAPI(
        title="cellinspect",
        version=__version__,
        description="Battery cell defect inspection: images in, pass/review/scrap out.",
        lifespan=lifespan,
        # app.openapi() still builds the schema in-process (tests, schemathesis).
        openapi_url="/openapi.json" if docs else None,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
    )
    app.state.service = service
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestGate, service=service)  # added last: runs first
    install_error_handlers(app)
    for router in (health.router, inspect.router, inspections.router, models.router, v2.router):
        app.include_router(router)
    return app
