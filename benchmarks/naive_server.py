"""The naive baseline: one FastAPI route that decodes, preprocesses and calls session.run per
request (no batching, no records). Same preprocessing and ORT settings as the service.

    CELLINSPECT_HOME=... BENCH_MODEL=name uvicorn --factory benchmarks.naive_server:create_app
"""

from __future__ import annotations

import os

import numpy as np
from fastapi import FastAPI, Request

from cellinspect.datasets.decode import decode_image
from cellinspect.datasets.preprocess import preprocess
from cellinspect.home import Home
from cellinspect.models.runtime import create_session
from cellinspect.models.store import ModelStore


def create_app() -> FastAPI:
    card, path = ModelStore(Home.resolve().store).load_verified(os.environ["BENCH_MODEL"])
    session = create_session(
        path,
        providers=os.environ.get("BENCH_PROVIDERS", "cpu").split(","),
        intra_op_threads=int(os.environ.get("BENCH_THREADS", "2")),
        spin=os.environ.get("BENCH_SPIN", "0") == "1",  # same ORT settings as the service
    )
    app = FastAPI()

    @app.get("/readyz")
    def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/infer")
    async def infer(request: Request) -> dict[str, list[float]]:
        image = decode_image(await request.body())
        x = preprocess(image, card.preprocessing)[None]
        (probs,) = session.run(["probabilities"], {"image": x})
        return {"probabilities": np.asarray(probs[0]).tolist()}

    return app
