"""How session 6 first measured inline decoding, on the tree before `DECODE_WORKERS=0`
existed: every pool call (images and frames alike) runs on the event loop's thread.

Meant for `--workers N` with N = cores: each process then has one loop thread doing the
Python and the decoding, and the batcher's worker doing ONNX Runtime."""

import cellinspect.serving.engine as engine


async def _inline_run(self, fn, *args):
    self._busy += 1
    try:
        return fn(*args)
    finally:
        self._busy -= 1


engine.DecodePool.run = _inline_run
