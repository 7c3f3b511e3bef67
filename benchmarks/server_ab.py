"""A/B of the serving hot path between two source trees (for example a commit before a refactor and the
working tree), on the same machine in one run: both servers up side by side, rounds alternating A, B, B, A, ...,
each after a warm-up, the same requests and load client (oodserve.bench.http_driver, aiohttp on uvloop).

    git worktree add /tmp/before COMMIT
    .venv/bin/python -m benchmarks.server_ab --a-tree /tmp/before --a-module service.cli \\
        --out benchmarks/results/server-ab.json

Rows: v2 JSON one image per request at concurrency 64 and 1, and v1 .npy with 8 images at concurrency 16. Figures
are medians over the rounds with the min-max range; the ratio is B / A.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from oodserve.bench.http_driver import free_port, request_bodies, run_client, send_requests, wait_until_ok
from oodserve.bench.peers.drivers import v2_json_bodies
from oodserve.datasets import DEFAULT_FASHION_MNIST_DIR, load_images

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "models" / "bundles" / "fashion-mnist"


class TreeServer:
    """`python -m MODULE serve` of one source tree (its directory first on PYTHONPATH) on a free loopback port."""

    def __init__(self, tree: Path | None, module: str, bundle: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ}
        if tree is not None:
            env["PYTHONPATH"] = str(tree)
        command = [sys.executable, "-m", module, "serve", "--bundle", str(bundle), "--port", str(self.port), "--log-level", "warning"]
        self.process = subprocess.Popen(command, env=env, cwd=tree or REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_until_ok(self.process, f"{self.url}/readyz", 180.0, f"server {module}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def measure(url: str, row: dict[str, Any], requests: int) -> float:
    """Images per second of one measured run (after a warm-up of 2 x concurrency requests)."""
    send = lambda count: send_requests(  # noqa: E731
        url, row["bodies"], row["content_type"], row["concurrency"], count, path=row["path"]
    )
    run_client(send(2 * row["concurrency"]))
    started = time.perf_counter()
    outcomes = run_client(send(requests))
    elapsed = time.perf_counter() - started
    if outcomes.not_ok:
        raise RuntimeError(f"{outcomes.not_ok} requests failed on {url}{row['path']}")
    return requests * row["per_request"] / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a-tree", type=Path, required=True, help="source tree of A (put first on PYTHONPATH)")
    parser.add_argument("--a-module", default="oodserve.cli", help="A's CLI module (service.cli before the rename)")
    parser.add_argument("--b-tree", type=Path, default=None, help="source tree of B (default: this environment's oodserve)")
    parser.add_argument("--b-module", default="oodserve.cli")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=None)
    arguments = parser.parse_args()

    images = load_images(DEFAULT_FASHION_MNIST_DIR, "test").images[:512][:, None]
    model = orjson.loads((BUNDLE / "manifest.json").read_bytes())["name"]
    npy_bodies, npy_type = request_bodies(images, "npy", per_request=8)
    rows = [
        {"name": "v2 JSON, 1 image, c=64", "bodies": v2_json_bodies(images, 1), "content_type": "application/json",
         "path": f"/v2/models/{model}/infer", "concurrency": 64, "per_request": 1},
        {"name": "v2 JSON, 1 image, c=1", "bodies": v2_json_bodies(images, 1), "content_type": "application/json",
         "path": f"/v2/models/{model}/infer", "concurrency": 1, "per_request": 1},
        {"name": "v1 .npy, 8 images, c=16", "bodies": npy_bodies, "content_type": npy_type, "path": "/v1/score",
         "concurrency": 16, "per_request": 8},
    ]
    servers = {"A": TreeServer(arguments.a_tree, arguments.a_module, BUNDLE), "B": TreeServer(arguments.b_tree, arguments.b_module, BUNDLE)}
    results: dict[str, dict[str, list[float]]] = {row["name"]: {"A": [], "B": []} for row in rows}
    try:
        for round_index in range(arguments.rounds):
            order = ("A", "B") if round_index % 2 == 0 else ("B", "A")
            for row in rows:
                requests = arguments.requests if row["concurrency"] > 1 else arguments.requests // 4
                for side in order:
                    results[row["name"]][side].append(measure(servers[side].url, row, requests))
                    print(f"round {round_index + 1} {row['name']} {side}: {results[row['name']][side][-1]:.1f} images/s", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    summary = {}
    for name, sides in results.items():
        a, b = statistics.median(sides["A"]), statistics.median(sides["B"])
        summary[name] = {"A_median": a, "B_median": b, "ratio_B_over_A": b / a, "A_range": [min(sides["A"]), max(sides["A"])],
                         "B_range": [min(sides["B"]), max(sides["B"])], "rounds": sides}
        print(f"{name:28s} A {a:8.1f}  B {b:8.1f} images/s  B/A {b / a:.3f}  (A {min(sides['A']):.0f}-{max(sides['A']):.0f}, "
              f"B {min(sides['B']):.0f}-{max(sides['B']):.0f})")
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "a": {"tree": str(arguments.a_tree), "module": arguments.a_module},
              "b": {"tree": str(arguments.b_tree or "this environment"), "module": arguments.b_module}, "rows": summary}
    if arguments.out is not None:
        arguments.out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY) + b"\n")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
