"""The profile's categories: each active sample lands in the first category one of its frames matches; idle
threads are left out."""

from __future__ import annotations

from oodserve.bench.profile_hot_path import categorise


def test_samples_are_sorted_into_the_first_matching_category_and_idle_ones_dropped() -> None:
    raw = "\n".join([
        "thread (1);_worker (concurrent/futures/thread.py:81);score_merged (batching.py:120);ModelRunner.run (x);Session.run (y) 50",
        "thread (1);score_merged (batching.py:120);Engine.score_model_outputs (engine.py:1);png_length_bits (z) 20",
        "thread (2);run_asgi (httptools_impl.py:1);HotPathMiddleware.__call__ (h);infer (r);parse_infer_request (c) 10",
        "thread (2);run_asgi (httptools_impl.py:1);HotPathMiddleware.__call__ (h);infer (r);Response.__call__ (s) 5",
        "thread (2);Runner.run (asyncio/runners.py:1) 7",
        "thread (3);_worker (concurrent/futures/thread.py:81);get (queue.py:1);wait (threading.py:320) 99",
        "not a sample line",
    ])
    counts, total = categorise(raw)
    assert total == 92  # the idle inference thread's 99 samples are not active
    assert counts["onnxruntime Session.run (the bundle's models)"] == 50
    assert counts["scoring in Python (signals, p-values, fusion, p-value histograms)"] == 20
    assert counts["request parsing (JSON / tensors -> checked batch)"] == 10
    assert counts["response (v2 tensors, send)"] == 5
    assert counts["event loop and other"] == 7
