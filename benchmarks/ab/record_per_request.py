"""Before the per-turn hand-over: each record goes to the writer's queue as soon as its
request adds it, so the writer may commit the first records of a batch before the rest."""

import asyncio

from cellinspect.serving import records


async def add(self, record):  # RecordStore.add as it was
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    if self._writer is None:
        self.start_sync()
    with self._lock:
        if self._closed:
            raise records.RecordStoreUnavailable("record store is closed")
        self._queue.put([records._Pending(record, future, loop)])
    try:
        async with asyncio.timeout(self.commit_timeout_s):
            return await future
    except TimeoutError:
        raise records.RecordStoreUnavailable(
            f"inspection record not committed within {self.commit_timeout_s:g} s"
        ) from None


records.RecordStore.add = add
