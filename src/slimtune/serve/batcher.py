"""Dynamic batching: requests wait in a bounded queue and run together, up to `max_batch` texts. While the
model runs a batch, arriving requests queue and form the next one; `max_wait_ms` lets a request that finds
the model idle wait that long for company (0: run at once).

One worker thread runs the model (its kernels use every core already; two batches at once would only
fight over them). A request whose client went away is cancelled and skipped: it frees its place in the
queue and is never run. Written by hand: the few lines of queueing logic are not worth a dependency.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field


class QueueFull(Exception):
    """The queue holds `max_queue` texts already: the caller answers 429."""


@dataclass
class _Item:
    texts: list[str]
    pairs: list[str] | None
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)
    queued: bool = True  # still in the queue (not yet taken into a batch)


class Batcher:
    def __init__(self, run: Callable[[list[str], list[str] | None], list], max_batch: int, max_wait_ms: float,
                 max_queue: int, on_batch: Callable[[int], None] | None = None,
                 on_depth: Callable[[int], None] | None = None):
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait_ms / 1000
        self.max_queue, self.on_batch, self.on_depth = max_queue, on_batch, on_depth
        self.pending: deque[_Item] = deque()
        self.waiting = 0  # texts queued and not yet handed to the model
        self.wakeup = asyncio.Event()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="slimtune-model")
        self.task: asyncio.Task | None = None
        self.closing = False

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, texts: list[str], pairs: list[str] | None = None) -> list:
        if self.closing:
            raise QueueFull("the server is switching or stopping")
        if self.waiting + len(texts) > self.max_queue:
            raise QueueFull(f"the queue holds {self.waiting} of at most {self.max_queue} texts")
        item = _Item(texts, pairs, asyncio.get_running_loop().create_future())
        self.pending.append(item)
        self._depth(len(texts))
        self.wakeup.set()
        try:
            return await item.future
        finally:
            if not item.future.done():  # the client went away while queued: free the place now
                item.future.cancel()
            if item.queued:  # (a flag, not a scan of the queue on every answer)
                item.queued = False
                self.pending.remove(item)
                self._depth(-len(texts))

    def _depth(self, change: int) -> None:
        self.waiting += change
        if self.on_depth:
            self.on_depth(self.waiting)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                if self.closing:
                    return
                self.wakeup.clear()
                await self.wakeup.wait()
            # wait for a full batch, or until the oldest request has waited max_wait
            deadline = self.pending[0].arrived + self.max_wait
            while self.waiting < self.max_batch and (delay := deadline - time.monotonic()) > 0 and not self.closing:
                self.wakeup.clear()
                try:
                    await asyncio.wait_for(self.wakeup.wait(), delay)
                except TimeoutError:
                    break
            batch, size = [], 0
            while self.pending and (not batch or size + len(self.pending[0].texts) <= self.max_batch):
                item = self.pending.popleft()
                item.queued = False
                self._depth(-len(item.texts))
                if item.future.done():  # cancelled while queued
                    continue
                batch.append(item)
                size += len(item.texts)
            if not batch:
                continue
            texts = [t for item in batch for t in item.texts]
            paired = batch[0].pairs is not None
            pairs = [p for item in batch for p in item.pairs] if paired else None
            if self.on_batch:
                self.on_batch(len(texts))
            try:
                results = await loop.run_in_executor(self.executor, self._run_chunks, texts, pairs)
            except Exception as e:  # a real bug: every request of the batch gets it (and a 500)
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)
                continue
            start = 0
            for item in batch:
                if not item.future.done():
                    item.future.set_result(results[start:start + len(item.texts)])
                start += len(item.texts)

    def _run_chunks(self, texts: list[str], pairs: list[str] | None) -> list:
        """One request may hold more than max_batch texts: it runs alone, in chunks of max_batch."""
        out = []
        for i in range(0, len(texts), self.max_batch):
            out += self.run(texts[i:i + self.max_batch], pairs[i:i + self.max_batch] if pairs else None)
        return out

    async def close(self) -> None:
        """Finish what is queued, then stop (a reload's old model, or shutdown)."""
        self.closing = True
        self.wakeup.set()
        if self.task is not None:
            await self.task
        self.executor.shutdown(wait=True)
