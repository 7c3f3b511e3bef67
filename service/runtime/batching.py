"""Dynamic micro-batching: concurrent score requests for one bundle are merged into one onnxruntime run.

Request handlers (on the event loop) put their validated images in a per-engine queue. Whenever an
inference thread is free, what is queued (up to `max_batch_size` instances; a request larger than
that is split into chunks) goes to it as one merged batch, and every request gets its own slice of
the scores back, in order; requests that arrive during a run form the next batch. The queue is
bounded (QueueFullError -> 503 with Retry-After) and every request has a deadline
(DeadlineExceededError -> 504), so nothing waits forever.

A fixed pool of inference threads (one per core by default) is shared by all engines, with
single-threaded onnxruntime sessions: the cores are never oversubscribed, and side-by-side runs use
them better than onnxruntime's intra-op parallelism does for these models. onnxruntime releases the
GIL, so the event loop keeps parsing requests meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from oodserve.config import Settings
from oodserve.scoring.pipeline import BatchScores

if TYPE_CHECKING:
    from oodserve.engine import Engine

logger = logging.getLogger("oodserve.batching")

REFUSAL_REASONS = ("queue_full", "deadline")
"""Why a request was refused by the scheduler: 503 when the queue was full, 504 past its deadline."""


@dataclass(frozen=True)
class BatchingOptions:
    """enabled False = naive serving (one onnxruntime run per request in a thread pool, no queue).

    max_batch_size: most instances in one merged run; max_queue_delay_ms: how long a dispatch
    waits for requests that are already being read to join a batch (it never waits when none are);
    queue_capacity: most instances waiting in one engine's queue; deadline_ms: per-request limit
    on queueing plus inference; retry_after_s: the Retry-After of a refusal; inference_threads: merged
    runs in flight at once (one per core with single-threaded onnxruntime sessions, which use small
    merged batches better than one run with intra-op threads; docs/pages/benchmarks.md has the figures).
    """

    enabled: bool = True
    max_batch_size: int = 64
    max_queue_delay_ms: float = 0.0
    queue_capacity: int = 4096
    deadline_ms: float = 10_000.0
    retry_after_s: int = 1
    inference_threads: int = 1
    min_batch_beside_run: int = 0
    """A merged run starts while another is in flight only once at least this many instances are queued; fewer wait
    for the running one to end (then they go at once). Under load this makes fewer, fuller runs (onnxruntime's cost
    per image falls with the batch), and a lone request never waits: with no run in flight it goes at once. 0 = off."""
    side_by_side_max_batch: int = 0
    """A merged run of at most this many instances that starts while no other run is in flight runs the
    bundle's models side by side (one helper thread): the lone request of a quiet service uses two
    cores instead of one. 0 = never; needs inference_threads >= 2."""

    @classmethod
    def from_settings(cls, settings: Settings) -> BatchingOptions:
        """Dynamic batching options from the settings."""
        return cls(
            enabled=settings.batching,
            max_batch_size=settings.batch_max_size,
            max_queue_delay_ms=settings.batch_max_delay_ms,
            queue_capacity=settings.batch_queue_capacity,
            deadline_ms=settings.batch_deadline_seconds * 1000.0,
            inference_threads=settings.inference_threads or os.cpu_count() or 1,
            side_by_side_max_batch=settings.batch_side_by_side_max,
            min_batch_beside_run=settings.batch_min_beside_run,
        )

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
        predicted_class=None if first.predicted_class is None else np.concatenate([part.predicted_class for part in parts]),
        confidence=None if first.confidence is None else np.concatenate([part.confidence for part in parts]),
    )


def score_merged(
    engine: Engine, image_parts: Sequence[np.ndarray], alphas: Sequence[float], helper: Executor | None = None
) -> list[BatchScores]:
    """Runs in the inference thread: one onnxruntime run over all parts (each (n_i, *input_shape)),
    scored once, split back into one BatchScores per part at that part's alpha. With `helper` the
    bundle's models run side by side (ModelRunner.run), and the helper thread, whose models take less
    time than the slowest one, first computes the signals' input-only parts (Engine.prepare_signals)."""
    images = image_parts[0] if len(image_parts) == 1 else np.concatenate(image_parts)
    if helper is None:
        merged = engine.score_model_outputs(images, engine.runner.run(images, helper))
    else:  # the helper thread has time to spare beside the slowest model: the input-only parts of the signals go first
        prepared = helper.submit(engine.prepare_signals, images)
        outputs = engine.runner.run(images, helper)
        merged = engine.score_model_outputs(images, outputs, prepared=prepared.result())
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
    enqueued_at: float = 0.0


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
    """The queue of one engine on one event loop, driven by callbacks (no task of its own).

    A request that finds no run in flight is dispatched at once (with every other queued chunk that
    fits). While a run is in flight, a second run starts on an idle inference thread only once
    min_batch_beside_run instances are queued; fewer wait and go together as soon as a run ends
    (nothing waits longer than the run in flight). With max_queue_delay_ms > 0 a dispatch beside a
    running batch (or, with one inference thread, any dispatch) waits, at most that long, while
    announced requests are still being read and the batch is not full. The engine is held weakly
    between runs, so a batcher never keeps an engine alive after the registry dropped it (hot reload).
    """

    def __init__(
        self,
        engine: Engine,
        options: BatchingOptions,
        executor: Callable[[], ThreadPoolExecutor],
        on_queue_wait: Callable[[str, float], None] | None = None,
        side_by_side: Callable[[int], Executor | None] | None = None,
    ) -> None:
        """side_by_side(instances): the helper executor when a run of that size may run its models side by side."""
        self._engine = weakref.ref(engine)
        self._side_by_side = side_by_side
        self._on_queue_wait = on_queue_wait
        self.engine_name = engine.name
        self.options = options
        self.loop = asyncio.get_running_loop()
        self.stats = BatcherStats()
        self.arriving = 0
        self.queued_instances = 0
        self.running = 0
        """Merged runs in flight (at most options.inference_threads)."""
        self.closed = False
        self._executor = executor
        self._queue: deque[_Chunk] = deque()
        self._in_flight: dict[int, list[_Chunk]] = {}
        self._delay: asyncio.TimerHandle | None = None
        self._queued_during_run = False
        """Requests queued while the last run was in the inference thread: clients are concurrent, so the
        next batch may wait (max_queue_delay_ms) for the ones whose answers just went out to come back."""

    def enqueue(self, engine: Engine, images: np.ndarray, alpha: float, deadline: float) -> list[asyncio.Future[BatchScores]]:
        """Queue a request's images (split into chunks of at most max_batch_size); QueueFullError when the
        queue holds instances and these would take it past queue_capacity."""
        count = int(images.shape[0])
        capacity = self.options.queue_capacity
        if self.queued_instances and self.queued_instances + count > capacity:
            self.stats.rejected_full += 1
            raise QueueFullError(
                f"the queue of model {self.engine_name!r} is full ({self.queued_instances} of {capacity} instances waiting); "
                f"retry after {self.options.retry_after_s} s",
                self.options.retry_after_s,
            )
        futures: list[asyncio.Future[BatchScores]] = []
        step = self.options.max_batch_size
        for start in range(0, count, step):
            future: asyncio.Future[BatchScores] = self.loop.create_future()
            self._queue.append(_Chunk(images[start : start + step], alpha, future, deadline, self.loop.time()))
            futures.append(future)
        self.queued_instances += count
        self.maybe_dispatch(engine)
        return futures

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

    def maybe_dispatch(self, engine: Engine | None = None) -> None:
        """Start a merged run unless every inference thread is busy, nothing is queued, or the batch waits."""
        if self.running >= self.options.inference_threads or self.closed or not self._queue:
            return
        delay = self.options.max_queue_delay_ms / 1000.0
        busy = self.arriving > 0 or self._queued_during_run
        # Work-conserving across threads: a batch waits only while another run keeps a core busy (or when there is
        # one inference thread, whose idle core the event loop uses meanwhile); an idle thread never waits for a
        # fuller batch while no run is in flight.
        others_busy = self.running > 0 or self.options.inference_threads == 1
        if self._too_small_beside_a_run():
            return  # the running batch's end dispatches these; a run this small beside it would waste a core's time
        if delay > 0 and busy and others_busy and self.queued_instances < self.options.max_batch_size:
            if self._delay is None:
                self._delay = self.loop.call_later(delay, self._delay_over)
            return
        self._dispatch(engine)

    def _too_small_beside_a_run(self) -> bool:
        return self.running > 0 and self.queued_instances < self.options.min_batch_beside_run

    def _delay_over(self) -> None:
        self._delay = None
        if self.running < self.options.inference_threads and not self.closed and not self._too_small_beside_a_run():
            self._dispatch(None)

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
            if self._on_queue_wait is not None:
                self._on_queue_wait(self.engine_name, now - chunk.enqueued_at)
        return chunks

    def _dispatch(self, engine: Engine | None) -> None:
        """Hand the next merged batch to the inference thread; its completion comes back via _finish."""
        if self._delay is not None:
            self._delay.cancel()
            self._delay = None
        self._queued_during_run = False
        engine = engine or self._engine()
        chunks = self._take_batch()
        if not chunks:
            return
        if engine is None:  # unreachable while requests hold the engine; fail rather than wait forever
            self._fail(chunks, RuntimeError(f"model {self.engine_name!r} is no longer loaded"))
            return
        helper = self._side_by_side(sum(int(chunk.images.shape[0]) for chunk in chunks)) if self._side_by_side else None
        try:
            work = self._executor().submit(
                score_merged, engine, [chunk.images for chunk in chunks], [chunk.alpha for chunk in chunks], helper
            )
        except RuntimeError as error:  # the executor was shut down
            self._fail(chunks, error)
            return
        self.running += 1
        self._in_flight[id(work)] = chunks
        work.add_done_callback(self._work_done)

    def _work_done(self, work: Future[list[BatchScores]]) -> None:
        """Runs in the inference thread: hand the finished run back to the event loop."""
        try:
            self.loop.call_soon_threadsafe(self._finish, work)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _finish(self, work: Future[list[BatchScores]]) -> None:
        """On the loop: resolve the run's chunks (results or the error), then start the next batch."""
        chunks = self._in_flight.pop(id(work), [])
        self.running -= 1
        if self.closed:
            return
        self._queued_during_run = bool(self._queue)
        error = work.exception() if not work.cancelled() else RuntimeError("the merged run was cancelled")
        if error is not None:
            logger.error("merged run for model %s failed: %r", self.engine_name, error, exc_info=error)
            self._fail(chunks, error)
        else:
            self.stats.record(sum(int(chunk.images.shape[0]) for chunk in chunks))
            for chunk, result in zip(chunks, work.result()):
                if not chunk.future.done():
                    chunk.future.set_result(result)
        self.maybe_dispatch()

    @staticmethod
    def _fail(chunks: Sequence[_Chunk], error: BaseException) -> None:
        for chunk in chunks:
            if not chunk.future.done():
                chunk.future.set_exception(error)

    def close(self) -> None:
        """Fail every queued and running request at once; later completions are ignored."""
        self.closed = True
        if self._delay is not None:
            self._delay.cancel()
            self._delay = None
        pending = [*(chunk for chunks in self._in_flight.values() for chunk in chunks), *self._queue]
        self._queue.clear()
        self._in_flight.clear()
        self.queued_instances = 0
        self._fail(pending, RuntimeError("the service is shutting down"))


class Arrival:
    """A request that is being read for an engine; a batch may wait briefly for it to join (max_queue_delay_ms)."""

    def __init__(self, batcher: EngineBatcher | None) -> None:
        self._batcher = batcher
        if batcher is not None:
            batcher.arriving += 1

    def release(self) -> None:
        """The request is queued or has failed: stop counting it (idempotent)."""
        if self._batcher is not None:
            self._batcher.arriving -= 1
            self._batcher.maybe_dispatch()
            self._batcher = None

    def __enter__(self) -> Arrival:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class BatchScheduler:
    """The process's scoring scheduler: one batcher per engine, one pool of inference threads for all of them.

    Batchers are created on demand on the running event loop and keyed weakly by engine, so a
    reloaded engine gets its own and a dropped one is freed with its batcher.
    """

    def __init__(self, options: BatchingOptions, on_queue_wait: Callable[[str, float], None] | None = None) -> None:
        """on_queue_wait(model, seconds): called once per request chunk when it leaves the queue for a run."""
        self.options = options
        self.on_queue_wait = on_queue_wait
        self._executor: ThreadPoolExecutor | None = None
        self._helper: ThreadPoolExecutor | None = None
        self._batchers: weakref.WeakKeyDictionary[Engine, EngineBatcher] = weakref.WeakKeyDictionary()
        self.refusals: Counter[tuple[str, str]] = Counter()
        """(model, reason in REFUSAL_REASONS) -> requests refused since start; kept across bundle reloads."""

    def _inference_executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self.options.inference_threads, thread_name_prefix="oodserve-inference")
        return self._executor

    def _side_by_side_helper(self, instances: int) -> Executor | None:
        """The helper thread for a run of `instances` that starts while no other run is in flight, else None."""
        options = self.options
        if options.inference_threads < 2 or not 0 < instances <= options.side_by_side_max_batch:
            return None
        if any(batcher.running for batcher in list(self._batchers.values())):
            return None
        if self._helper is None:
            self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oodserve-side-by-side")
        return self._helper

    def _batcher_for(self, engine: Engine) -> EngineBatcher:
        loop = asyncio.get_running_loop()
        batcher = self._batchers.get(engine)
        if batcher is None or batcher.loop is not loop or batcher.closed:
            batcher = EngineBatcher(engine, self.options, self._inference_executor, self.on_queue_wait, self._side_by_side_helper)
            self._batchers[engine] = batcher
        return batcher

    def stats(self, engine: Engine) -> BatcherStats | None:
        """Counters of the engine's batcher (None before its first request)."""
        batcher = self._batchers.get(engine)
        return batcher.stats if batcher is not None else None

    def queued_instances(self) -> int:
        """Instances waiting in all queues now."""
        return sum(self.queued_instances_by_model().values())

    def queued_instances_by_model(self) -> dict[str, int]:
        """Model name -> instances waiting in its queue now (an engine being replaced by a reload adds to its name)."""
        depth: Counter[str] = Counter()
        for batcher in list(self._batchers.values()):
            depth[batcher.engine_name] += batcher.queued_instances
        return dict(depth)

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
        try:
            return await self._score_batched(engine, images, alpha, arrival)
        except QueueFullError:
            self.refusals[(engine.name, "queue_full")] += 1
            raise
        except DeadlineExceededError:
            self.refusals[(engine.name, "deadline")] += 1
            raise

    async def _score_batched(self, engine: Engine, images: np.ndarray, alpha: float | None, arrival: Arrival | None) -> BatchScores:
        level = engine.default_alpha if alpha is None else float(alpha)
        batcher = self._batcher_for(engine)
        deadline = batcher.loop.time() + self.options.deadline_ms / 1000.0
        try:
            futures = batcher.enqueue(engine, images, level, deadline)
        finally:
            if arrival is not None:
                arrival.release()
        try:
            async with asyncio.timeout_at(deadline):
                if len(futures) == 1:  # the usual request: no gather wrapper future and its callbacks
                    outcomes: list[BatchScores | BaseException]
                    try:
                        outcomes = [await futures[0]]
                    except Exception as error:  # noqa: BLE001 - raised below, as gather(return_exceptions=True) would
                        outcomes = [error]
                else:
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
        """Fail every waiting request and stop the inference thread (a later request starts it again)."""
        for batcher in list(self._batchers.values()):
            batcher.close()
        self._batchers = weakref.WeakKeyDictionary()
        for pool in (self._executor, self._helper):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._executor = self._helper = None
