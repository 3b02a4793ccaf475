"""Before 1bb339c: a lone request decodes on the decode pool, then runs on the batcher's
worker (two thread hand-offs), never both in one hop."""

import cellinspect.serving.engine as engine

engine.DecodePool.idle = property(lambda self: False)  # the one-hop path never starts
