"""Drift store benchmark: three replicas feeding one Valkey/Redis against replicas testing alone, on the shipped
Fashion-MNIST bundle's fused statistic (scores cached by benchmarks/drift.py).

    .venv/bin/python -m benchmarks.drift_store [--null-replays 300] [--length 3000] [--delay-replays 100]
        [--out benchmarks/results/drift-store.json]

A redis-server is started on a loopback port (no persistence). Three `RedisDriftStore` replicas (each its own
connection, worker thread and tie-breaking generator; the code `oodserve serve` runs) take a stream's request
batches round-robin, as a load balancer spreads them; tests/service/drift/test_replicas_live.py runs the same with
real `oodserve serve` processes.

- Null: calibration (M = the bundle's calibration size) and stream drawn i.i.d. from the fused scores of the 2,000
  held-out training images, so exchangeable by construction. Shared: the one stream in the store alarms when its
  martingale reaches 1/delta. One process: the same stream through one in-memory monitor. Alone: each replica
  tests its third of the stream in memory; the deployment alarms when any of the three does (up to 3 x delta).
  Rates with Clopper-Pearson 95% intervals.
- Delay: a clean prefix of test images, then each input is MNIST with probability 0.1; inputs after the change
  until the shared stream alarms (the store's `alarm_at`), until one process seeing every input alarms (offline
  replay of the same stream), and until the first of three replicas testing alone alarms (in stream inputs).
- Cost: the store call per input (one script call per request batch of 1, 8 and 64 inputs, on loopback) and the
  request path's `observe` (queueing only), p50 and p90 per input.
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import redis

from benchmarks.drift import fused_scores
from oodserve.bench.http_driver import free_port
from oodserve.drift.conformal_martingale import MixturePowerMartingale, OnlineConformalPValues
from oodserve.drift.monitor import DriftMonitor, DriftSettings
from oodserve.drift.redis_store import RedisDriftStore
from oodserve.drift.replay import first_crossing
from oodserve.drift.store import StoreOptions
from oodserve.stats import clopper_pearson

REPLICAS = 3
BATCH = 10
WAVE = 25
"""Streams fed side by side (then the store is emptied): keeps the store's memory small."""


def start_store(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("valkey-server") or shutil.which("redis-server")
    assert binary is not None, "install redis-server (make test does)"
    port = free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir",
                                str(directory)], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return process, f"redis://127.0.0.1:{port}/0"


def replicas_for(url: str, settings: DriftSettings) -> list[RedisDriftStore]:
    return [RedisDriftStore(settings, StoreOptions(url=url, timeout_ms=1000.0)) for _ in range(REPLICAS)]


def feed_round_robin(stores: list[RedisDriftStore], monitors: list[DriftMonitor] | None,
                     streams: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Every stream in request batches of BATCH, batch b to replica (b + stream index) mod 3, streams interleaved."""
    length = max(len(stream) for _, stream in streams.values())
    for start in range(0, length, BATCH):
        for index, (name, (calibration, stream)) in enumerate(streams.items()):
            batch = stream[start : start + BATCH]
            replica = (start // BATCH + index) % REPLICAS
            stores[replica].observe("m", name, calibration, batch)
            if monitors is not None:
                monitors[replica].observe("m", name, calibration, batch)
    for store in stores:
        assert store.flush(600), "the store did not take every input"


def null_run(url: str, pool: np.ndarray, calibration_size: int, replays: int, length: int, delta: float) -> dict[str, object]:
    settings = DriftSettings(delta=delta, max_streams=WAVE)
    stores = replicas_for(url, settings)
    client = redis.Redis.from_url(url)
    shared = alone = one = 0
    began = time.monotonic()
    try:
        for wave in range(0, replays, WAVE):
            monitors = [DriftMonitor(DriftSettings(delta=delta, max_streams=WAVE)) for _ in range(REPLICAS)]
            single = DriftMonitor(DriftSettings(delta=delta, max_streams=WAVE))
            streams = {}
            for replay in range(wave, min(wave + WAVE, replays)):
                rng = np.random.default_rng([11, replay])
                streams[f"null-{replay}"] = (rng.choice(pool, calibration_size), rng.choice(pool, length))
            feed_round_robin(stores, monitors, streams)
            for name, (calibration, stream) in streams.items():
                for start in range(0, length, BATCH):
                    single.observe("m", name, calibration, stream[start : start + BATCH])
            one += sum(report.alarm for report in single.reports())
            reports = stores[0].snapshot().reports
            assert sorted(report.stream for report in reports) == sorted(streams)
            assert all(report.inputs_since_reset == length for report in reports)
            shared += sum(report.alarm for report in reports)
            alone += sum(any(report.alarm for monitor in monitors for report in monitor.reports() if report.stream == name)
                         for name in streams)
            client.flushdb()
            print(f"null: {min(wave + WAVE, replays)}/{replays} streams, shared {shared}, one process {one}, alone {alone}, "
                  f"{time.monotonic() - began:.0f} s", flush=True)
    finally:
        for store in stores:
            store.close()
    return {
        "replays": replays, "length": length, "delta": delta, "calibration_size": calibration_size,
        "shared_store": {"alarms": shared, "rate": shared / replays, "ci95": clopper_pearson(shared, replays)},
        "one_process": {"alarms": one, "rate": one / replays, "ci95": clopper_pearson(one, replays)},
        "three_replicas_alone": {"alarms": alone, "rate": alone / replays, "ci95": clopper_pearson(alone, replays)},
    }


def one_process_crossing(calibration: np.ndarray, stream: np.ndarray, rng: np.random.Generator, delta: float) -> int | None:
    online = OnlineConformalPValues(calibration, rng)
    path = MixturePowerMartingale().update(online.p_values(stream))
    crossing = first_crossing(path, -math.log(delta))
    return None if crossing is None else crossing + 1  # inputs seen when it alarmed, as the store's alarm_at


def delay_run(url: str, scores: dict[str, np.ndarray], replays: int, delta: float, clean: int, after: int) -> dict[str, object]:
    settings = DriftSettings(delta=delta, max_streams=WAVE)
    stores = replicas_for(url, settings)
    client = redis.Redis.from_url(url, decode_responses=True)
    calibration, test, mnist = scores["calibration"], scores["test"], scores["mnist"]
    delays: dict[str, list[float]] = {"shared_store": [], "one_process": [], "three_replicas_alone": []}
    try:
        for wave in range(0, replays, WAVE):
            streams = {}
            for replay in range(wave, min(wave + WAVE, replays)):
                rng = np.random.default_rng([12, replay])
                mixed = np.where(rng.random(after) < 0.1, rng.choice(mnist, after), rng.choice(test, after))
                stream = np.concatenate([rng.choice(test, clean), mixed])
                streams[f"mix-{replay}"] = (calibration, stream)
                crossing = one_process_crossing(calibration, stream, rng, delta)
                delays["one_process"].append(math.inf if crossing is None else crossing - clean)
                positions = np.arange(len(stream))
                alone = []
                for replica in range(REPLICAS):  # the positions replica r gets under feed_round_robin
                    mine = positions[((positions // BATCH) + (replay - wave)) % REPLICAS == replica]
                    local = one_process_crossing(calibration, stream[mine], rng, delta)
                    alone.append(math.inf if local is None else float(mine[local - 1] + 1 - clean))
                delays["three_replicas_alone"].append(min(alone))
            feed_round_robin(stores, None, streams)
            for name in streams:
                at = int(client.hget(f"oodserve:drift:state:m\n{name}", "alarm_at") or 0)
                delays["shared_store"].append(math.inf if at == 0 else at - clean)
            client.flushdb()
            print(f"delay: {min(wave + WAVE, replays)}/{replays} streams", flush=True)
    finally:
        for store in stores:
            store.close()
    summary = {}
    for name, values in delays.items():
        array = np.asarray(values)
        censored = np.where(np.isinf(array), after, array)
        summary[name] = {"median": float(np.median(censored)), "p90": float(np.quantile(censored, 0.9)),
                         "missed": int(np.isinf(array).sum()), "alarms_before_the_change": int((array < 0).sum())}
    summary["ratio_shared_to_one_process_median"] = summary["shared_store"]["median"] / summary["one_process"]["median"]
    return {"replays": replays, "clean_prefix": clean, "mixed_inputs": after, "mnist_fraction": 0.1, "delays": summary}


def cost_run(url: str, scores: dict[str, np.ndarray], rounds: int) -> dict[str, object]:
    """Per-input cost of one store call per request batch, and of the request path's observe (queueing)."""
    client = redis.Redis.from_url(url)
    pings = []
    for _ in range(rounds):
        began = time.perf_counter()
        client.ping()
        pings.append((time.perf_counter() - began) * 1e6)
    result: dict[str, object] = {"ping_round_trip_us": {"p50": float(np.median(pings)), "p90": float(np.quantile(pings, 0.9))}}
    print("loopback PING round trip (us):", result["ping_round_trip_us"], flush=True)
    calibration, test = scores["calibration"], scores["test"]
    for batch in (1, 8, 64):
        store = RedisDriftStore(DriftSettings(), StoreOptions(url=url))
        rng = np.random.default_rng(batch)
        call_us, observe_us = [], []
        try:
            for request in range(rounds + 20):
                values = rng.choice(test, batch)
                with store._lock:  # the worker's own step, timed alone: the batch becomes one call and is sent
                    began = time.perf_counter()
                    store.observe("m", f"cost-{batch}", calibration, values)
                    queued = time.perf_counter()
                    store._form_calls()
                    call = store._in_flight.popleft()
                    store._in_flight_inputs -= batch
                sending = time.perf_counter()
                store._send(call)
                done = time.perf_counter()
                if request >= 20:  # the first calls load the script and the calibration
                    observe_us.append((queued - began) / batch * 1e6)
                    call_us.append((done - sending) / batch * 1e6)
        finally:
            store.close()
        result[f"batch_{batch}"] = {
            "store_call_us_per_input": {"p50": float(np.median(call_us)), "p90": float(np.quantile(call_us, 0.9))},
            "observe_us_per_input": {"p50": float(np.median(observe_us)), "p90": float(np.quantile(observe_us, 0.9))},
            "calls": len(call_us),
        }
        print(f"cost batch {batch}:", result[f"batch_{batch}"], flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--null-replays", type=int, default=300)
    parser.add_argument("--length", type=int, default=3000)
    parser.add_argument("--delay-replays", type=int, default=100)
    parser.add_argument("--delta", type=float, default=0.01)
    parser.add_argument("--cost-rounds", type=int, default=2000)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/oodserve-drift-scores.npz"))
    parser.add_argument("--phases", default="cost,delay,null", help="comma-separated subset of cost, delay, null")
    parser.add_argument("--out", type=Path, default=None)
    arguments = parser.parse_args()
    scores = fused_scores(arguments.cache)
    with tempfile.TemporaryDirectory() as directory:
        process, url = start_store(Path(directory))
        try:
            report: dict[str, object] = {"replicas": REPLICAS, "request_batch": BATCH, "store": url.split("/")[2]}
            phases = set(arguments.phases.split(","))
            if "cost" in phases:
                report["cost"] = cost_run(url, scores, arguments.cost_rounds)
            if "delay" in phases:
                report["delay"] = delay_run(url, scores, arguments.delay_replays, arguments.delta, clean=1000, after=3000)
                print("delay:", report["delay"], flush=True)
            if "null" in phases:
                report["null"] = null_run(url, scores["held_out"], len(scores["calibration"]), arguments.null_replays,
                                          arguments.length, arguments.delta)
                print("null:", report["null"], flush=True)
        finally:
            process.kill()
            process.wait()
    if arguments.out is not None:
        arguments.out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))


if __name__ == "__main__":
    main()
