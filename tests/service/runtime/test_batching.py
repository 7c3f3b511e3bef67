"""Dynamic batching: requests merged into one run and split back in order, large requests split, per-request
alpha, bounded queue (503 + Retry-After), deadlines (504), failures reach every waiter, nothing hangs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from oodserve.engine import Engine, EngineRegistry
from oodserve.runtime.batching import (
    BatchingOptions,
    BatchScheduler,
    DeadlineExceededError,
    QueueFullError,
    concatenate_scores,
    score_merged,
    slice_scores,
)
from oodserve.runtime.sessions import RuntimeOptions
from oodserve.scoring.pipeline import BatchScores
from oodserve.server.app import create_app
from oodserve.server.state import app_state

WAIT_S = 10.0
"""Upper bound for anything a test waits on, so a bug fails the test instead of hanging it."""


class GatedRunner:
    """A runner whose runs record their batch sizes and can be held at a gate (threading.Event)."""

    def __init__(self, fail: bool = False) -> None:
        self.batch_sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail = fail

    def run(self, images: np.ndarray, helper: Any = None) -> dict[str, dict[str, np.ndarray]]:
        self.entered.set()
        assert self.gate.wait(WAIT_S), "test gate never opened"
        self.batch_sizes.append(int(images.shape[0]))
        if self.fail:
            raise RuntimeError("onnxruntime exploded")
        return {"model": {"marker": images[:, 0, 0, 0].astype(np.float64)}}


class MarkerEngine:
    """An engine whose scores identify their image: every value equals the image's first pixel / 100."""

    name = "marker"
    default_alpha = 0.5

    def __init__(self, fail: bool = False) -> None:
        self.runner = GatedRunner(fail)

    def prepare_signals(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return {}

    def score_model_outputs(
        self,
        images: np.ndarray,
        outputs: dict[str, dict[str, np.ndarray]],
        alpha: float | None = None,
        prepared: dict[str, np.ndarray] | None = None,
    ) -> BatchScores:
        level = self.default_alpha if alpha is None else alpha
        marker = outputs["model"]["marker"] / 100.0
        return BatchScores(
            signals={"marker": marker},
            p_values={"marker": marker},
            fused_score=marker,
            fused_p_value=marker,
            is_ood=marker < level,
            alpha=level,
            predicted_class=np.floor(marker * 10).astype(np.int64),
            confidence=marker,
        )

    def score(self, images: np.ndarray, alpha: float | None = None) -> BatchScores:
        return self.score_model_outputs(images, self.runner.run(images), alpha)


def marked(*markers: int) -> np.ndarray:
    """Images (N, 1, 2, 2) whose first pixel is the marker."""
    images = np.zeros((len(markers), 1, 2, 2), dtype=np.float32)
    images[:, 0, 0, 0] = markers
    return images


def run(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, WAIT_S))


async def wait_until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.001)


def test_concurrent_requests_share_one_run_and_get_their_own_rows_back() -> None:
    engine = MarkerEngine()

    async def scenario() -> tuple[list[BatchScores], list[int]]:
        scheduler = BatchScheduler(BatchingOptions(max_batch_size=64, max_queue_delay_ms=0))
        engine.runner.gate.clear()
        first = asyncio.create_task(scheduler.score(engine, marked(1)))
        await asyncio.to_thread(engine.runner.entered.wait, WAIT_S)  # the first run holds the inference thread
        others = [
            asyncio.create_task(scheduler.score(engine, marked(*markers), alpha))
            for markers, alpha in (([2, 3], 0.1), ([4], 0.9), ([5, 6, 7], None))
        ]
        await asyncio.sleep(0.01)
        engine.runner.gate.set()
        results = [await first, *[await task for task in others]]
        await scheduler.close()
        return results, engine.runner.batch_sizes

    results, batch_sizes = run(scenario())
    assert batch_sizes == [1, 6]  # three waiting requests merged into one run of 6 instances
    assert [result.fused_score.tolist() for result in results] == [[0.01], [0.02, 0.03], [0.04], [0.05, 0.06, 0.07]]
    assert [result.alpha for result in results] == [0.5, 0.1, 0.9, 0.5]
    assert [result.is_ood.tolist() for result in results] == [[True], [True, True], [True], [True, True, True]]
    assert results[2].predicted_class.tolist() == [0] and results[3].confidence.tolist() == [0.05, 0.06, 0.07]


def test_verdicts_follow_each_requests_alpha_inside_a_merged_run() -> None:
    engine = MarkerEngine()

    async def scenario() -> list[BatchScores]:
        scheduler = BatchScheduler(BatchingOptions(max_queue_delay_ms=0))
        engine.runner.gate.clear()
        blocker = asyncio.create_task(scheduler.score(engine, marked(99)))  # holds the inference thread
        await asyncio.to_thread(engine.runner.entered.wait, WAIT_S)
        tasks = [asyncio.create_task(scheduler.score(engine, marked(30, 60), alpha)) for alpha in (0.2, 0.5, 0.7)]
        await asyncio.sleep(0.01)
        engine.runner.gate.set()
        await blocker
        results = [await task for task in tasks]
        await scheduler.close()
        return results

    results = run(scenario())
    assert engine.runner.batch_sizes == [1, 6]
    assert [result.is_ood.tolist() for result in results] == [[False, False], [True, False], [True, True]]


def test_a_request_larger_than_the_batch_limit_is_split_and_rejoined_in_order() -> None:
    engine = MarkerEngine()

    async def scenario() -> BatchScores:
        scheduler = BatchScheduler(BatchingOptions(max_batch_size=4, max_queue_delay_ms=0))
        result = await scheduler.score(engine, marked(*range(10)))
        await scheduler.close()
        return result

    result = run(scenario())
    assert engine.runner.batch_sizes == [4, 4, 2]
    assert result.fused_score.tolist() == pytest.approx([index / 100 for index in range(10)])
    assert result.is_ood.shape == (10,) and result.alpha == 0.5


def test_a_batch_waits_for_announced_requests_but_not_when_none_are_coming() -> None:
    engine = MarkerEngine()

    async def scenario() -> list[BatchScores]:
        scheduler = BatchScheduler(BatchingOptions(max_queue_delay_ms=2000))
        alone = await scheduler.score(engine, marked(1))  # nothing announced: dispatched at once
        arrival = scheduler.arrival(engine)  # a second request is still being read
        first = asyncio.create_task(scheduler.score(engine, marked(2)))
        await asyncio.sleep(0.05)
        assert not first.done()  # held back for the announced request
        second = await scheduler.score(engine, marked(3), None, arrival)
        results = [alone, await first, second]
        await scheduler.close()
        return results

    results = run(scenario())
    assert engine.runner.batch_sizes == [1, 2]
    assert [result.fused_score.tolist() for result in results] == [[0.01], [0.02], [0.03]]


def test_after_a_run_with_waiting_requests_the_next_batch_waits_for_returning_clients() -> None:
    """Requests queued during a run show concurrent clients: the next batch waits max_queue_delay_ms for more."""
    engine = MarkerEngine()

    async def scenario() -> list[float]:
        scheduler = BatchScheduler(BatchingOptions(max_queue_delay_ms=300))
        engine.runner.gate.clear()
        first = asyncio.create_task(scheduler.score(engine, marked(1)))
        await asyncio.to_thread(engine.runner.entered.wait, WAIT_S)
        queued = [asyncio.create_task(scheduler.score(engine, marked(marker))) for marker in (2, 3)]
        await asyncio.sleep(0.01)
        engine.runner.gate.set()
        await first
        await asyncio.sleep(0.05)
        assert not any(task.done() for task in queued)  # held for a returning client
        late = await scheduler.score(engine, marked(4))
        results = [await task for task in queued]
        await scheduler.close()
        return [result.fused_score.item() for result in (*results, late)]

    assert run(scenario()) == [0.02, 0.03, 0.04]
    assert engine.runner.batch_sizes == [1, 3]


def test_with_two_inference_threads_only_a_batch_beside_a_running_one_waits_for_more() -> None:
    """Work-conserving: with no run in flight an announced request does not hold a batch back (the core would idle);
    while one run is in flight, the second thread's batch waits max_queue_delay_ms for announced requests."""
    engine = MarkerEngine()

    async def scenario() -> list[float]:
        scheduler = BatchScheduler(BatchingOptions(inference_threads=2, max_queue_delay_ms=2000))
        engine.runner.gate.clear()
        coming = scheduler.arrival(engine)  # announced, still being read
        first = asyncio.create_task(scheduler.score(engine, marked(1)))
        await asyncio.to_thread(engine.runner.entered.wait, WAIT_S)  # dispatched at once despite the announcement
        second = asyncio.create_task(scheduler.score(engine, marked(2)))
        await asyncio.sleep(0.05)
        assert not second.done() and engine.runner.batch_sizes == []  # beside a running batch: held for the announced one
        third = asyncio.create_task(scheduler.score(engine, marked(3), None, coming))
        await asyncio.sleep(0.05)
        engine.runner.gate.set()
        results = [await task for task in (first, second, third)]
        await scheduler.close()
        return [result.fused_score.item() for result in results]

    assert run(scenario()) == [0.01, 0.02, 0.03]
    assert sorted(engine.runner.batch_sizes) == [1, 2]


def test_a_run_beside_a_running_one_starts_only_with_min_batch_beside_run_instances_queued() -> None:
    """Fewer than min_batch_beside_run queued instances wait for the running batch to end; that many start beside it."""
    engine = MarkerEngine()
    starts: list[int] = []
    original_run = engine.runner.run

    def recorded_run(images: np.ndarray, helper: Any = None) -> dict[str, dict[str, np.ndarray]]:
        starts.append(int(images.shape[0]))
        return original_run(images)

    engine.runner.run = recorded_run  # type: ignore[method-assign]

    async def scenario() -> list[float]:
        scheduler = BatchScheduler(BatchingOptions(inference_threads=2, min_batch_beside_run=3, max_queue_delay_ms=0))
        engine.runner.gate.clear()
        first = asyncio.create_task(scheduler.score(engine, marked(1)))  # nothing in flight: starts at once
        await asyncio.to_thread(engine.runner.entered.wait, WAIT_S)
        waiting = [asyncio.create_task(scheduler.score(engine, marked(marker))) for marker in (2, 3)]
        await asyncio.sleep(0.05)
        assert starts == [1]  # 2 queued < 3: held although a thread is idle
        third = asyncio.create_task(scheduler.score(engine, marked(4)))
        await asyncio.sleep(0.05)
        assert starts == [1, 3]  # the third queued instance starts a run beside the first
        late = asyncio.create_task(scheduler.score(engine, marked(5)))
        await asyncio.sleep(0.05)
        engine.runner.gate.set()
        results = [await task for task in (first, *waiting, third, late)]
        await scheduler.close()
        return [result.fused_score.item() for result in results]

    assert run(scenario()) == [0.01, 0.02, 0.03, 0.04, 0.05]
    assert starts == [1, 3, 1]  # the last one went when a run ended


def test_two_inference_threads_run_two_merged_batches_side_by_side() -> None:
    engine = MarkerEngine()
    inside = threading.Semaphore(0)
    original_run = engine.runner.run

    def counted_run(images: np.ndarray, helper: Any = None) -> dict[str, dict[str, np.ndarray]]:
        inside.release()
        return original_run(images)

    engine.runner.run = counted_run  # type: ignore[method-assign]

    async def scenario() -> list[BatchScores]:
        scheduler = BatchScheduler(BatchingOptions(inference_threads=2))
        engine.runner.gate.clear()
        first = asyncio.create_task(scheduler.score(engine, marked(1)))
        second = asyncio.create_task(scheduler.score(engine, marked(2)))
        for _ in range(2):  # both runs are inside onnxruntime at the same time
            assert await asyncio.to_thread(inside.acquire, True, WAIT_S)
        rest = [asyncio.create_task(scheduler.score(engine, marked(marker))) for marker in (3, 4, 5)]
        await asyncio.sleep(0.01)
        assert scheduler.queued_instances() == 3
        engine.runner.gate.set()
        results = [await task for task in (first, second, *rest)]
        await scheduler.close()
        return results

    results = run(scenario())
    assert [result.fused_score.item() for result in results] == [0.01, 0.02, 0.03, 0.04, 0.05]
    assert sorted(engine.runner.batch_sizes) == [1, 1, 3] or sorted(engine.runner.batch_sizes) == [1, 1, 1, 2]


class HelperRecordingRunner(GatedRunner):
    """A gated runner that records, per run, whether the scheduler gave it the side-by-side helper."""

    def __init__(self) -> None:
        super().__init__()
        self.given_helper: list[bool] = []

    def run(self, images: np.ndarray, helper: Any = None) -> dict[str, dict[str, np.ndarray]]:
        self.given_helper.append(helper is not None)
        return super().run(images)


def test_only_a_lone_small_run_runs_its_models_side_by_side() -> None:
    engine = MarkerEngine()
    engine.runner = HelperRecordingRunner()

    async def scenario() -> None:
        scheduler = BatchScheduler(BatchingOptions(inference_threads=2, side_by_side_max_batch=2, max_queue_delay_ms=0))
        engine.runner.gate.clear()
        lone = asyncio.create_task(scheduler.score(engine, marked(1)))
        await wait_until(lambda: len(engine.runner.given_helper) == 1)
        beside = asyncio.create_task(scheduler.score(engine, marked(2)))  # starts while the first is in flight
        await wait_until(lambda: len(engine.runner.given_helper) == 2)
        engine.runner.gate.set()
        assert [(await task).fused_score.item() for task in (lone, beside)] == [0.01, 0.02]
        assert (await scheduler.score(engine, marked(3, 4, 5))).fused_score.tolist() == [0.03, 0.04, 0.05]  # too large
        assert (await scheduler.score(engine, marked(6))).fused_score.tolist() == [0.06]  # alone again
        await scheduler.close()

    run(scenario())
    assert engine.runner.given_helper == [True, False, False, True]


def test_models_side_by_side_give_exactly_the_outputs_of_one_after_another(real_engine: Engine, make_images) -> None:
    from concurrent.futures import ThreadPoolExecutor

    images = make_images(3, 17).astype(np.float32)
    observed: list[tuple[int, dict[str, float]]] = []
    real_engine.runner.observer = lambda instances, seconds: observed.append((instances, seconds))
    try:
        one_after_another = real_engine.runner.run(images)
        with ThreadPoolExecutor(max_workers=1) as helper:
            side_by_side = real_engine.runner.run(images, helper)
    finally:
        real_engine.runner.observer = None
    assert list(side_by_side) == list(one_after_another) == list(real_engine.runner.sessions)
    for model, outputs in one_after_another.items():
        assert list(side_by_side[model]) == list(outputs)
        for name, values in outputs.items():
            assert np.array_equal(side_by_side[model][name], values), (model, name)
    assert [(instances, sorted(seconds)) for instances, seconds in observed] == [(3, sorted(real_engine.runner.sessions))] * 2


def test_a_full_queue_refuses_and_the_refused_request_leaves_no_trace() -> None:
    engine = MarkerEngine()

    async def scenario() -> None:
        scheduler = BatchScheduler(BatchingOptions(queue_capacity=3, max_queue_delay_ms=0, retry_after_s=2))
        engine.runner.gate.clear()
        running = asyncio.create_task(scheduler.score(engine, marked(1)))
        await asyncio.to_thread(engine.runner.entered.wait, WAIT_S)
        queued = asyncio.create_task(scheduler.score(engine, marked(2, 3)))
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError) as refused:
            await scheduler.score(engine, marked(4, 5))
        assert refused.value.retry_after_s == 2
        engine.runner.gate.set()
        assert (await running).fused_score.tolist() == [0.01]
        assert (await queued).fused_score.tolist() == [0.02, 0.03]
        assert scheduler.stats(engine).rejected_full == 1
        await scheduler.close()

    run(scenario())
    assert engine.runner.batch_sizes == [1, 2]


def test_a_request_past_its_deadline_fails_and_is_never_run() -> None:
    engine = MarkerEngine()

    async def scenario() -> None:
        scheduler = BatchScheduler(BatchingOptions(deadline_ms=100, max_queue_delay_ms=0))
        engine.runner.gate.clear()
        slow = asyncio.create_task(scheduler.score(engine, marked(1)))
        await asyncio.to_thread(engine.runner.entered.wait, WAIT_S)
        with pytest.raises(DeadlineExceededError):
            await scheduler.score(engine, marked(2))
        with pytest.raises(DeadlineExceededError):
            await slow
        engine.runner.gate.set()
        after = await scheduler.score(engine, marked(3))  # the service still works afterwards
        assert after.fused_score.tolist() == [0.03]
        await scheduler.close()

    run(scenario())
    assert engine.runner.batch_sizes == [1, 1]  # the expired request (marker 2) was dropped, not run


def test_a_cancelled_request_leaves_the_queue_at_once() -> None:
    """A client that goes away (its handler is cancelled) frees its queue capacity and is never run."""
    engine = MarkerEngine()

    async def scenario() -> None:
        scheduler = BatchScheduler(BatchingOptions(queue_capacity=2, max_queue_delay_ms=0))
        engine.runner.gate.clear()
        running = asyncio.create_task(scheduler.score(engine, marked(1)))
        await asyncio.to_thread(engine.runner.entered.wait, WAIT_S)
        gone = asyncio.create_task(scheduler.score(engine, marked(2, 3)))
        await wait_until(lambda: scheduler.queued_instances() == 2)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert scheduler.queued_instances() == 0
        kept = asyncio.create_task(scheduler.score(engine, marked(4, 5)))  # fits again
        await wait_until(lambda: scheduler.queued_instances() == 2)
        engine.runner.gate.set()
        assert (await running).fused_score.tolist() == [0.01]
        assert (await kept).fused_score.tolist() == [0.04, 0.05]
        await scheduler.close()

    run(scenario())
    assert engine.runner.batch_sizes == [1, 2]


def test_a_failing_run_reaches_every_waiter_and_the_batcher_keeps_going() -> None:
    engine = MarkerEngine(fail=True)

    async def scenario() -> None:
        scheduler = BatchScheduler(BatchingOptions(max_queue_delay_ms=0))
        outcomes = await asyncio.gather(*[scheduler.score(engine, marked(index)) for index in range(5)], return_exceptions=True)
        assert all(isinstance(outcome, RuntimeError) and "exploded" in str(outcome) for outcome in outcomes)
        engine.runner.fail = False
        assert (await scheduler.score(engine, marked(7))).fused_score.tolist() == [0.07]
        await scheduler.close()

    run(scenario())


def test_closing_fails_queued_requests_instead_of_leaving_them_waiting() -> None:
    engine = MarkerEngine()

    async def scenario() -> None:
        scheduler = BatchScheduler(BatchingOptions(max_queue_delay_ms=0))
        engine.runner.gate.clear()
        tasks = [asyncio.create_task(scheduler.score(engine, marked(index))) for index in range(3)]
        await asyncio.to_thread(engine.runner.entered.wait, WAIT_S)
        await scheduler.close()
        engine.runner.gate.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(outcome, RuntimeError) for outcome in outcomes)

    run(scenario())


def test_a_batcher_does_not_keep_a_dropped_engine_alive() -> None:
    """After a hot reload the old engine (and its onnxruntime sessions) must be freed."""
    import gc
    import weakref

    async def scenario() -> weakref.ref[MarkerEngine]:
        scheduler = BatchScheduler(BatchingOptions())
        engine = MarkerEngine()
        assert (await scheduler.score(engine, marked(4))).fused_score.tolist() == [0.04]
        assert scheduler.stats(engine).runs == 1
        reference = weakref.ref(engine)
        del engine
        gc.collect()
        assert scheduler.queued_instances() == 0
        await scheduler.close()
        return reference

    assert run(scenario())() is None


def test_naive_mode_runs_each_request_alone() -> None:
    engine = MarkerEngine()

    async def scenario() -> list[BatchScores]:
        scheduler = BatchScheduler(BatchingOptions(enabled=False))
        results = await asyncio.gather(*[scheduler.score(engine, marked(index, index + 1)) for index in range(4)])
        await scheduler.close()
        return results

    results = run(scenario())
    assert engine.runner.batch_sizes == [2, 2, 2, 2]
    assert [result.fused_score.tolist() for result in results] == [[index / 100, (index + 1) / 100] for index in range(4)]


def test_slices_of_a_merged_batch_rejoin_to_the_whole() -> None:
    engine = MarkerEngine()
    images = marked(*range(0, 100, 9))
    whole = engine.score(images, 0.3)
    parts = [slice_scores(whole, start, min(start + 4, len(images)), 0.3) for start in range(0, len(images), 4)]
    joined = concatenate_scores(parts)
    for field in ("fused_score", "fused_p_value", "is_ood", "predicted_class", "confidence"):
        assert np.array_equal(getattr(joined, field), getattr(whole, field)), field
    assert np.array_equal(joined.signals["marker"], whole.signals["marker"])


@pytest.fixture(scope="module")
def real_engine(bundle_dir: Path) -> Engine:
    return Engine.load(bundle_dir, RuntimeOptions(intra_op_threads=1, inter_op_threads=1))


def test_merged_runs_score_exactly_like_separate_runs(real_engine: Engine, make_images) -> None:
    """The real test bundle: 12 concurrent requests of 1-3 images with their own alphas, merged."""
    rng = np.random.default_rng(3)
    requests = [
        (make_images(int(rng.integers(1, 4)), 100 + index).astype(np.float32), float(rng.choice([0.05, 0.1, 0.5]))) for index in range(12)
    ]

    async def scenario() -> tuple[list[BatchScores], int]:
        scheduler = BatchScheduler(BatchingOptions(max_batch_size=8, max_queue_delay_ms=0))
        results = await asyncio.gather(*[scheduler.score(real_engine, images, alpha) for images, alpha in requests])
        runs = scheduler.stats(real_engine).runs
        await scheduler.close()
        return results, runs

    results, runs = run(scenario())
    assert runs < len(requests)
    for (images, alpha), batched in zip(requests, results):
        alone = real_engine.score(images, alpha)
        assert batched.alpha == alpha
        assert np.array_equal(batched.is_ood, alone.is_ood)
        np.testing.assert_allclose(batched.fused_score, alone.fused_score, rtol=1e-9)
        np.testing.assert_allclose(batched.fused_p_value, alone.fused_p_value, rtol=1e-12)
        for name in alone.signals:
            np.testing.assert_allclose(batched.signals[name], alone.signals[name], rtol=1e-6, atol=1e-9)
        assert np.array_equal(batched.predicted_class, alone.predicted_class)


def test_a_side_by_side_run_with_prepared_signal_parts_scores_exactly_like_one_thread(real_engine: Engine, make_images) -> None:
    """The helper thread computes the input-only parts (PNG lengths) before its models: every signal, p-value and
    verdict equals the plain one-thread score bit for bit."""
    from concurrent.futures import ThreadPoolExecutor

    assert real_engine.prepare_signals(make_images(2, 7).astype(np.float32)).keys() == {"input_complexity"}
    with ThreadPoolExecutor(max_workers=1) as helper:
        for count in (1, 3, 8):
            images = make_images(count, 200 + count).astype(np.float32)
            beside = score_merged(real_engine, [images], [0.1], helper)[0]
            alone = real_engine.score(images, 0.1)
            for name in alone.signals:
                assert np.array_equal(beside.signals[name], alone.signals[name]), name
                assert np.array_equal(beside.p_values[name], alone.p_values[name]), name
            assert np.array_equal(beside.fused_p_value, alone.fused_p_value) and np.array_equal(beside.is_ood, alone.is_ood)


@pytest.fixture()
def gated_app(bundle_dir: Path, settings_for, real_engine: Engine) -> Iterator[tuple[Any, threading.Event, threading.Event]]:
    """An app over the real engine whose onnxruntime runs wait at a gate; ready without a lifespan."""

    gate = threading.Event()
    entered = threading.Event()
    original_run = real_engine.runner.run

    def gated_run(images: np.ndarray, helper: Any = None) -> dict[str, dict[str, np.ndarray]]:
        entered.set()
        assert gate.wait(WAIT_S)
        return original_run(images, helper)

    real_engine.runner.run = gated_run  # type: ignore[method-assign]
    app = create_app(
        settings_for(bundle_dir, batch_queue_capacity=2, batch_deadline_seconds=0.3, batch_max_delay_ms=0, inference_threads=1),
        EngineRegistry([real_engine]),
    )
    app_state(app).ready = True
    try:
        yield app, gate, entered
    finally:
        gate.set()
        del real_engine.runner.run


def test_http_full_queue_is_503_with_retry_after_and_deadline_is_504(
    gated_app: tuple[Any, threading.Event, threading.Event], make_images
) -> None:
    app, gate, entered = gated_app
    image = make_images(1, 5)[0].tolist()

    async def scenario() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            running = asyncio.create_task(client.post("/v1/score", json={"instances": [image]}))
            await asyncio.to_thread(entered.wait, WAIT_S)  # the first request is in the gated run; the queue is empty
            queued = asyncio.create_task(client.post("/v1/score", json={"instances": [image, image]}))
            await wait_until(lambda: app_state(app).batching.queued_instances() == 2)
            while_queued = await client.get("/metrics")
            refused = await client.post("/v1/score", json={"instances": [image]})
            timed_out = await asyncio.gather(running, queued)
            gate.set()
            after = await client.post("/v1/score", json={"instances": [image]})
            metrics_after = await client.get("/metrics")
            await app_state(app).batching.close()
            return [while_queued, refused, *timed_out, after, metrics_after]

    while_queued, refused, running, queued, after, metrics_after = run(scenario())
    model = app_state(app).registry.default_name
    assert f'oodserve_queue_instances{{model="{model}"}} 2.0' in while_queued.text
    assert "oodserve_queue_capacity_instances 2.0" in while_queued.text
    assert f'oodserve_queue_instances{{model="{model}"}} 0.0' in metrics_after.text
    assert f'oodserve_requests_refused_total{{model="{model}",reason="queue_full"}} 1.0' in metrics_after.text
    assert f'oodserve_requests_refused_total{{model="{model}",reason="deadline"}} 2.0' in metrics_after.text
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "overloaded" and "full" in refused.json()["error"]["message"]
    for response in (running, queued):
        assert response.status_code == 504 and response.json()["error"]["code"] == "deadline_exceeded"
    assert after.status_code == 200 and len(after.json()["results"]) == 1


@pytest.mark.parametrize("spinning", [False, True])
def test_onnxruntime_spinning_follows_the_setting(bundle_dir: Path, settings_for, spinning: bool) -> None:
    options = RuntimeOptions.from_settings(settings_for(bundle_dir, onnxruntime_spinning=spinning))
    engine = Engine.load(bundle_dir, options)
    for model in engine.runner.sessions.values():
        session_options = model.session.get_session_options()  # type: ignore[attr-defined]
        assert session_options.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spinning else "0")
