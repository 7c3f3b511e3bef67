"""Dynamic micro-batching: concurrent score requests for one bundle are merged into one onnxruntime run.

Request handlers (on the event loop) put their validated images in a per-engine queue; a collector
task takes what is queued (up to `max_batch_size` instances, a request larger than that is split into
chunks), hands the merged batch to the process's single inference thread, and gives every request
its own slice of the scores back, in order. The queue is bounded (QueueFullError -> 503 with
Retry-After) and every request has a deadline (DeadlineExceededError -> 504), so nothing waits forever.

One inference thread for all engines keeps the two cores from being oversubscribed: onnxruntime's
intra-op pool parallelises inside a run, the event loop parses requests on the other core.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from service.scoring.pipeline import BatchScores

if TYPE_CHECKING:
    from service.engine import Engine

logger = logging.getLogger("oodserve.batching")


@dataclass(frozen=True)
class BatchingOptions:
    """enabled False = naive serving (one onnxruntime run per request in a thread pool, no queue).

    max_batch_size: most instances in one merged run; max_queue_delay_ms: how long the collector
    waits for requests that are already being read to join a batch (it never waits when none are);
    queue_capacity: most instances waiting in one engine's queue; deadline_ms: per-request limit
    on queueing plus inference; idle_exit_s: an idle collector stops (restarted on demand).
    """

    enabled: bool = True
    max_batch_size: int = 64
    max_queue_delay_ms: float = 0.0
    queue_capacity: int = 1024
    deadline_ms: float = 10_000.0
    retry_after_s: int = 1
    idle_exit_s: float = 60.0


class QueueFullError(RuntimeError):
    """The engine's queue cannot take the request's instances now; retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceededError(RuntimeError):
    """The request was not scored within its deadline (queueing plus inference)."""


def slice_scores(scores: BatchScores, start: int, stop: int, alpha: float) -> BatchScores:
    """Rows [start, stop) of a merged batch's scores, with is_ood re-decided at this request's alpha.

    Every signal, p-value and fused value is per instance, so a slice of the merged result equals
    scoring the slice alone; only the verdict depends on alpha (is_ood = fused p-value < alpha).
    """
    fused_p_value = scores.fused_p_value[start:stop]
    return BatchScores(
        signals={name: values[start:stop] for name, values in scores.signals.items()},
        p_values={name: values[start:stop] for name, values in scores.p_values.items()},
        fused_score=scores.fused_score[start:stop],
        fused_p_value=fused_p_value,
        is_ood=fused_p_value < alpha,
        alpha=alpha,
        predicted_class=None if scores.predicted_class is None else scores.predicted_class[start:stop],
        confidence=None if scores.confidence is None else scores.confidence[start:stop],
    )


def concatenate_scores(parts: Sequence[BatchScores]) -> BatchScores:
    """Scores of consecutive chunks of one request (same alpha) joined back in order."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return BatchScores(
        signals={name: np.concatenate([part.signals[name] for part in parts]) for name in first.signals},
        p_values={name: np.concatenate([part.p_values[name] for part in parts]) for name in first.p_values},
        fused_score=np.concatenate([part.fused_score for part in parts]),
        fused_p_value=np.concatenate([part.fused_p_value for part in parts]),
        is_ood=np.concatenate([part.is_ood for part in parts]),
        alpha=first.alpha,
        predicted_class=None if first.predicted_class is None else np.concatenate([part.predicted_class for part in parts]),  # type: ignore[misc]
        confidence=None if first.confidence is None else np.concatenate([part.confidence for part in parts]),  # type: ignore[misc]
    )


def score_merged(engine: Engine, image_parts: Sequence[np.ndarray], alphas: Sequence[float]) -> list[BatchScores]:
    """Runs in the inference thread: one onnxruntime run over all parts (each (n_i, *input_shape)),
    scored once, split back into one BatchScores per part at that part's alpha."""
    images = image_parts[0] if len(image_parts) == 1 else np.concatenate(image_parts)
    merged = engine.score_model_outputs(images, engine.runner.run(images))
    results: list[BatchScores] = []
    start = 0
    for part, alpha in zip(image_parts, alphas):
        stop = start + part.shape[0]
        results.append(slice_scores(merged, start, stop, alpha))
        start = stop
    return results


@dataclass(eq=False)
class _Chunk:
    """At most max_batch_size instances of one request, waiting for their scores."""

    images: np.ndarray
    alpha: float
    future: asyncio.Future[BatchScores]
    deadline: float


@dataclass
class BatcherStats:
    """Counters of one engine's batcher (for tests and metrics)."""

    runs: int = 0
    instances: int = 0
    largest_batch: int = 0
    rejected_full: int = 0
    expired: int = 0
    batch_sizes: list[int] = field(default_factory=list)

    def record(self, size: int) -> None:
        self.runs += 1
        self.instances += size
        self.largest_batch = max(self.largest_batch, size)
        if len(self.batch_sizes) < 10_000:
            self.batch_sizes.append(size)


class EngineBatcher:
    """The queue and collector task of one engine on one event loop."""

    def __init__(
        self,
        engine: Engine,
        options: BatchingOptions,
        executor: ThreadPoolExecutor,
        on_exit: Callable[[EngineBatcher], None],
    ) -> None:
        self.engine = engine
        self.options = options
        self.loop = asyncio.get_running_loop()
        self.stats = BatcherStats()
        self.arriving = 0
        self.queued_instances = 0
        self.closed = False
        self._executor = executor
        self._on_exit = on_exit
        self._queue: deque[_Chunk] = deque()
        self._wakeup = asyncio.Event()
        self._task = self.loop.create_task(self._collect(), name=f"oodserve-batcher-{engine.name}")

    def enqueue(self, images: np.ndarray, alpha: float, deadline: float) -> list[asyncio.Future[BatchScores]]:
        """Queue a request's images (split into chunks of at most max_batch_size); QueueFullError when the
        queue holds instances and these would take it past queue_capacity."""
        count = int(images.shape[0])
        capacity = self.options.queue_capacity
        if self.queued_instances and self.queued_instances + count > capacity:
            self.stats.rejected_full += 1
            raise QueueFullError(
                f"the queue of model {self.engine.name!r} is full ({self.queued_instances} of {capacity} instances waiting); "
                f"retry after {self.options.retry_after_s} s",
                self.options.retry_after_s,
            )
        futures: list[asyncio.Future[BatchScores]] = []
        step = self.options.max_batch_size
        for start in range(0, count, step):
            future: asyncio.Future[BatchScores] = self.loop.create_future()
            self._queue.append(_Chunk(images[start : start + step], alpha, future, deadline))
            futures.append(future)
        self.queued_instances += count
        self._wakeup.set()
        return futures

    def wake(self) -> None:
        self._wakeup.set()

    def withdraw(self, futures: Sequence[asyncio.Future[BatchScores]]) -> None:
        """Take a given-up request's chunks out of the queue at once, so they stop using its capacity."""
        abandoned = set(futures)
        kept: deque[_Chunk] = deque()
        for chunk in self._queue:
            if chunk.future in abandoned:
                self.queued_instances -= int(chunk.images.shape[0])
            else:
                kept.append(chunk)
        self._queue = kept

    async def _wait_for_wakeup(self, timeout: float) -> bool:
        """True when woken, False when `timeout` seconds passed first."""
        self._wakeup.clear()
        try:
            async with asyncio.timeout(timeout):
                await self._wakeup.wait()
        except TimeoutError:
            return False
        return True

    async def _wait_for_more(self) -> None:
        """Give requests that are being read (announced, not yet queued) up to max_queue_delay_ms to join."""
        delay = self.options.max_queue_delay_ms / 1000.0
        if delay <= 0:
            return
        until = self.loop.time() + delay
        while self.queued_instances < self.options.max_batch_size and self.arriving > 0:
            remaining = until - self.loop.time()
            if remaining <= 0 or not await self._wait_for_wakeup(remaining):
                return

    def _take_batch(self) -> list[_Chunk]:
        """Pop chunks in order up to max_batch_size instances, dropping cancelled and expired ones."""
        now = self.loop.time()
        chunks: list[_Chunk] = []
        size = 0
        while self._queue:
            chunk = self._queue[0]
            count = int(chunk.images.shape[0])
            if not chunk.future.done() and chunk.deadline > now and chunks and size + count > self.options.max_batch_size:
                break
            self._queue.popleft()
            self.queued_instances -= count
            if chunk.future.done():
                continue
            if chunk.deadline <= now:
                self.stats.expired += 1
                chunk.future.set_exception(DeadlineExceededError("the request's deadline passed while it was queued"))
                continue
            chunks.append(chunk)
            size += count
        return chunks

    async def _run(self, chunks: list[_Chunk]) -> None:
        """Score the merged chunks in the inference thread and resolve each chunk's future."""
        size = sum(int(chunk.images.shape[0]) for chunk in chunks)
        try:
            results = await self.loop.run_in_executor(
                self._executor, score_merged, self.engine, [chunk.images for chunk in chunks], [chunk.alpha for chunk in chunks]
            )
        except asyncio.CancelledError:
            self._fail(chunks, RuntimeError("the service is shutting down"))
            raise
        except Exception as error:  # noqa: BLE001 - every waiter must hear about any failure
            logger.exception("merged run of %d instances for model %s failed", size, self.engine.name)
            self._fail(chunks, error)
            return
        self.stats.record(size)
        for chunk, result in zip(chunks, results):
            if not chunk.future.done():
                chunk.future.set_result(result)

    @staticmethod
    def _fail(chunks: Sequence[_Chunk], error: BaseException) -> None:
        for chunk in chunks:
            if not chunk.future.done():
                chunk.future.set_exception(error)

    async def _collect(self) -> None:
        """Collector loop: wait for work, optionally for more, take a batch, run it; exit when idle."""
        try:
            while True:
                if not self._queue:
                    woken = await self._wait_for_wakeup(self.options.idle_exit_s)
                    if not woken and not self._queue and self.arriving == 0:
                        return
                    continue
                await self._wait_for_more()
                chunks = self._take_batch()
                if chunks:
                    await self._run(chunks)
        finally:
            self.closed = True
            remaining = list(self._queue)
            self._queue.clear()
            self.queued_instances = 0
            self._fail(remaining, RuntimeError("the batcher stopped"))
            self._on_exit(self)

    def stop(self) -> None:
        """Cancel the collector (queued and running requests fail at once)."""
        self._task.cancel()


class Arrival:
    """A request that is being read for an engine; the collector may wait briefly for it to join a batch."""

    def __init__(self, batcher: EngineBatcher | None) -> None:
        self._batcher = batcher
        if batcher is not None:
            batcher.arriving += 1

    def release(self) -> None:
        """The request is queued or has failed: stop counting it (idempotent)."""
        if self._batcher is not None:
            self._batcher.arriving -= 1
            self._batcher.wake()
            self._batcher = None

    def __enter__(self) -> Arrival:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class BatchScheduler:
    """The process's scoring scheduler: one batcher per engine, one inference thread for all of them.

    Batchers are created on demand on the running event loop (so a reloaded engine gets its own) and
    leave when idle, so an engine that is no longer served is not kept alive by its batcher.
    """

    def __init__(self, options: BatchingOptions) -> None:
        self.options = options
        self._executor: ThreadPoolExecutor | None = None
        self._batchers: dict[int, EngineBatcher] = {}

    def _batcher_for(self, engine: Engine) -> EngineBatcher:
        loop = asyncio.get_running_loop()
        batcher = self._batchers.get(id(engine))
        if batcher is None or batcher.engine is not engine or batcher.loop is not loop or batcher.closed:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oodserve-inference")
            batcher = EngineBatcher(engine, self.options, self._executor, self._forget)
            self._batchers[id(engine)] = batcher
        return batcher

    def _forget(self, batcher: EngineBatcher) -> None:
        if self._batchers.get(id(batcher.engine)) is batcher:
            del self._batchers[id(batcher.engine)]

    def stats(self, engine: Engine) -> BatcherStats | None:
        """Counters of the engine's current batcher (None when it has none right now)."""
        batcher = self._batchers.get(id(engine))
        return batcher.stats if batcher is not None and batcher.engine is engine else None

    def queued_instances(self) -> int:
        """Instances waiting in all queues now."""
        return sum(batcher.queued_instances for batcher in self._batchers.values())

    def arrival(self, engine: Engine) -> Arrival:
        """Announce a request for `engine` whose body is being read (use as a context manager)."""
        return Arrival(self._batcher_for(engine) if self.options.enabled else None)

    async def score(self, engine: Engine, images: np.ndarray, alpha: float | None = None, arrival: Arrival | None = None) -> BatchScores:
        """Scores of images (N, *input_shape) float32 at alpha (default: the bundle's), in order.

        Batched: QueueFullError when the queue is full, DeadlineExceededError after deadline_ms.
        Naive (enabled False): engine.score in the thread pool, one onnxruntime run per request.
        """
        if not self.options.enabled:
            import anyio.to_thread

            if arrival is not None:
                arrival.release()
            return await anyio.to_thread.run_sync(engine.score, images, alpha)
        level = engine.default_alpha if alpha is None else float(alpha)
        batcher = self._batcher_for(engine)
        deadline = batcher.loop.time() + self.options.deadline_ms / 1000.0
        try:
            futures = batcher.enqueue(images, level, deadline)
        finally:
            if arrival is not None:
                arrival.release()
        try:
            async with asyncio.timeout_at(deadline):
                outcomes = await asyncio.gather(*futures, return_exceptions=True)
        except TimeoutError as error:
            batcher.withdraw(futures)
            raise DeadlineExceededError(f"not scored within the deadline of {self.options.deadline_ms:g} ms") from error
        except asyncio.CancelledError:  # the client went away or an outer timeout fired
            batcher.withdraw(futures)
            raise
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return concatenate_scores(outcomes)  # type: ignore[arg-type]

    async def close(self) -> None:
        """Stop every collector and the inference thread (a later request starts them again)."""
        batchers = list(self._batchers.values())
        for batcher in batchers:
            batcher.stop()
        for batcher in batchers:
            if batcher.loop is asyncio.get_running_loop():
                try:
                    await batcher._task
                except asyncio.CancelledError:
                    pass
        self._batchers.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
