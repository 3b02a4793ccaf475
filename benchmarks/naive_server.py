"""The naive baseline: one FastAPI route that decodes, preprocesses and calls session.run per
request (no batching, no records). Same preprocessing and ORT settings as the service.

    CELLINSPECT_HOME=... BENCH_MODEL=name uvicorn --factory benchmarks.naive_server:create_app

With BENCH_RECORDS=1 the route also stores each answer the naive way before it returns:
one INSERT and COMMIT per request on the event loop, in the service's own table and SQLite
settings (WAL, synchronous=FULL) under the home, with the service's verdict policy
(`decide`, the card's operating point) and the image's sha256. That is the least
a route must do to meet "every answered inspection is stored before the response leaves",
so it measures what durability costs a design without batching or a writer thread.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from datetime import UTC, datetime

import numpy as np
from fastapi import FastAPI, Request
from sqlalchemy import insert

from cellinspect.datasets.decode import decode_image
from cellinspect.datasets.preprocess import preprocess
from cellinspect.home import Home
from cellinspect.models.runtime import create_session
from cellinspect.models.store import ModelStore
from cellinspect.serving.policy import decide
from cellinspect.serving.records import InspectionRow, RecordStore


def create_app() -> FastAPI:
    home = Home.resolve()
    card, path = ModelStore(home.store).load_verified(os.environ["BENCH_MODEL"])
    session = create_session(
        path,
        providers=os.environ.get("BENCH_PROVIDERS", "cpu").split(","),
        intra_op_threads=int(os.environ.get("BENCH_THREADS", "2")),
        spin=os.environ.get("BENCH_SPIN", "0") == "1",  # same ORT settings as the service
    )
    # Only its engine (the service's pragmas) and schema are used: no writer thread.
    records = RecordStore(home.database_url) if os.environ.get("BENCH_RECORDS") == "1" else None
    app = FastAPI()

    @app.get("/readyz")
    def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/infer")
    async def infer(request: Request) -> dict[str, list[float]]:
        data = await request.body()
        image = decode_image(data)
        x = preprocess(image, card.preprocessing)[None]
        (probs,) = session.run(["probabilities"], {"image": x})
        answer = np.asarray(probs[0]).tolist()
        if records is not None:
            decision = decide(probs[0], card, line_id=None, line_points={})
            with records.engine.begin() as conn:
                conn.execute(
                    insert(InspectionRow),
                    {
                        "id": uuid.uuid4().hex,
                        "created": datetime.now(UTC),
                        "model_name": card.name,
                        "model_version": card.version,
                        "label": decision.label,
                        "confidence": decision.confidence,
                        "probabilities": dict(zip(card.class_names, answer, strict=True)),
                        "verdict": decision.verdict.value,
                        "defect_probability": decision.defect_probability,
                        "timings": {},
                        "image_sha256": hashlib.sha256(data).hexdigest(),
                    },
                )
        return {"probabilities": answer}

    return app
