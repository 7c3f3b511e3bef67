"""Where a single-image request's server CPU goes: `python -m oodserve.bench.profile_hot_path [--concurrency 64]`.

Starts `oodserve serve` on the bundle (loopback, default settings), sends single-image v2 JSON infer requests
from `--concurrency` clients (the benchmarks' aiohttp client on uvloop, same machine), records the server with
py-spy (`pip install py-spy`; sampling every thread, `--rate` per second for `--seconds`) and sorts every
active sample into one category by the frames on its stack (first match in CATEGORIES order wins). Prints
the table and writes it to --output.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import orjson

from oodserve.bench.http_driver import ServerProcess, run_client, send_requests
from oodserve.bench.peers.drivers import v2_json_bodies
from oodserve.datasets import DEFAULT_FASHION_MNIST_DIR, load_images

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BUNDLE = REPO / "models" / "bundles" / "fashion-mnist"

CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("onnxruntime Session.run (the bundle's models)", ("Session.run",)),
    ("scoring in Python (signals, p-values, fusion, p-value histograms)", ("score_model_outputs",)),
    ("batching threads, other (merge, split, hand-back)", ("score_merged", "_WorkItem.run")),
    ("request parsing (JSON / tensors -> checked batch)", ("parse_infer_request", "read_score_images")),
    ("drift tests per request", ("observe_stream",)),
    ("response (v2 tensors, send)", ("infer_response", "Response.__call__")),
    ("metrics per request (verdict counts, request metrics)", ("observe_batch", "prometheus_client")),
    ("queueing and waiting for the batch (event loop side)", ("BatchScheduler.score",)),
    ("lean route, other", ("HotPathMiddleware",)),
    ("ASGI layers outside the lean route (FastAPI/Starlette, limits)", ("run_asgi",)),
    ("uvicorn HTTP parsing and transport", ("httptools_impl",)),
)
IDLE_LEAVES = ("select", "epoll", "poll", "wait (threading", "_worker (concurrent", "get (queue", "acquire")


def categorise(raw: str) -> tuple[Counter[str], int]:
    """py-spy `--format raw` lines (`frame;frame;... count`) -> samples per category, active samples in all."""
    counts: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        if any(marker in frames[-1] for marker in IDLE_LEAVES):
            continue
        count = int(count_text)
        total += count
        label = next((name for name, markers in CATEGORIES if any(marker in frame for frame in frames for marker in markers)), None)
        counts[label or "event loop and other"] += count
    return counts, total


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m oodserve.bench.profile_hot_path", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--images", type=Path, help="images for the bundle's input (default: the Fashion-MNIST test set)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=int, default=100)
    parser.add_argument("--output", type=Path, help="write the table here too")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2

    manifest = orjson.loads((args.bundle / "manifest.json").read_bytes())
    images = load_images(DEFAULT_FASHION_MNIST_DIR if args.images is None else args.images, "test").images[:512]
    images = images.reshape((len(images), *manifest["input"]["shape"]))
    bodies = v2_json_bodies(images, 1)
    headers = {"accept-encoding": "identity"}
    with ServerProcess(args.bundle, {}, None) as server, tempfile.TemporaryDirectory() as work:
        url = f"{server.url}/v2/models/{manifest['name']}/infer"
        run_client(send_requests(url, bodies, "application/json", args.concurrency, 500, path="", extra_headers=headers))
        outcome: dict[str, float] = {}

        def load() -> None:
            started = time.perf_counter()
            result = run_client(send_requests(url, bodies, "application/json", args.concurrency, 10**7, max_seconds=args.seconds + 4,
                                              path="", extra_headers=headers))
            outcome["images_per_second"] = result.statuses.get(200, 0) / (time.perf_counter() - started)
            outcome["errors"] = result.not_ok

        driver = threading.Thread(target=load)
        driver.start()
        time.sleep(2.0)
        raw = Path(work) / "raw.txt"
        subprocess.run([py_spy, "record", "-r", str(args.rate), "-d", str(int(args.seconds)), "-p", str(server.process.pid), "-f", "raw",
                        "-o", str(raw), "--threads"], check=True, capture_output=True)
        driver.join()
        counts, total = categorise(raw.read_text())
    title = (
        f"py-spy record -r {args.rate} -d {args.seconds:g} of `oodserve serve` ({args.bundle.name}, default settings) under "
        f"{args.concurrency} concurrent single-image v2 JSON clients\n(aiohttp on uvloop, same 2 cores; "
        f"{outcome.get('images_per_second', 0):.0f} images/s while sampled, {outcome.get('errors', 0):.0f} errors); "
        f"{total} samples of active threads"
    )
    lines = [title, *(f"{100 * count / max(total, 1):5.1f}%  {name}" for name, count in counts.most_common())]
    table = "\n".join(lines)
    print(table)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
