"""BentoML 1.4 comparison server for benchmarks/bench_serving.py (`--compare bentoml`).

Same work per image as benchmarks/naive_server.py: decode the posted PNG with
`decode_image`, `preprocess` with the model card's spec, ONNX Runtime on CPU
(`create_session(..., spin=False)`), probabilities back as JSON.

    CELLINSPECT_HOME=... BENCH_MODEL=name BENCH_THREADS=2 \\
        .venv-bentoml/bin/bentoml serve benchmarks.compare.bento_service:Inspect --port 3000
    curl --data-binary @image.png -H 'Content-Type: image/png' localhost:3000/infer

Not batched. A BentoML API takes the raw body only through a positional-only `bytes`
parameter (a root input whose schema is a string, which BentoML passes through unparsed;
other content types go through its JSON or multipart parsers). Adaptive batching
(`batchable=True`) merges the requests' inputs with `list.extend`: tried with this `bytes`
input, the API received one list of byte values (a 51,418-byte PNG arrived as a list of
51,418 ints), with nothing marking where one request's image ends. Batching would need a
second service (`bentoml.depends`), in its own process, taking decoded arrays: another
architecture than the one compared here.

Runs in this folder's own virtual environment (`benchmarks/compare/setup.sh`); the module
imports bentoml, which the project's environment does not have.
"""

from __future__ import annotations

import os

import bentoml
import numpy as np

from cellinspect.datasets.decode import decode_image
from cellinspect.datasets.preprocess import preprocess
from cellinspect.home import Home
from cellinspect.models.runtime import create_session
from cellinspect.models.store import ModelStore

# BentoML runs a sync API in a thread pool of `threads` (default 1): requests then run one
# at a time, like the naive server, while the event loop keeps reading the next ones.
THREADS = int(os.environ.get("BENCH_BENTO_THREADS", "1"))


@bentoml.service(
    name="cellinspect_bench",
    workers=1,
    threads=THREADS,
    traffic={"timeout": 60},
    logging={"access": {"enabled": False}},
)
class Inspect:
    def __init__(self) -> None:
        self.card, path = ModelStore(Home.resolve().store).load_verified(os.environ["BENCH_MODEL"])
        self.session = create_session(
            path, intra_op_threads=int(os.environ.get("BENCH_THREADS", "2")), spin=False
        )

    @bentoml.api(route="/infer")
    def infer(self, image: bytes, /) -> dict[str, list[float]]:
        x = preprocess(decode_image(image), self.card.preprocessing)[None]
        (probs,) = self.session.run(["probabilities"], {"image": x})
        return {"probabilities": np.asarray(probs[0]).tolist()}
