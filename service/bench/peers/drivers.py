"""Load drivers the peer comparison needs beside oodserve.bench.http_driver: v2 JSON and gRPC request bodies, an
HTTP sender to any path with any headers, a KServe v2 gRPC sender, and the CPU time of a process tree.

`oodserve.bench.http_driver.send_requests` posts to /v1/score only and sets no headers but the content type;
the v2 rows go to /v2/models/NAME/infer on both servers and must say `Accept-Encoding: identity` (MLServer
gzips answers over 500 bytes otherwise), so `send_prepared` is the same design (one keep-alive connection
per worker, prebuilt requests, bounded count and time) with the URL and headers as arguments. Both
servers' v2 rows use it, so they pay the same client cost.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import numpy as np
import orjson

from oodserve.bench.http_driver import Outcomes, drive_workers, send_requests
from oodserve.procfs import process_stats, process_tree

GRPC_TIMEOUT_SECONDS = 120.0


def image_groups(images: np.ndarray, per_request: int) -> list[np.ndarray]:
    """Consecutive groups of `per_request` images (N, *shape) uint8, the last partial group dropped."""
    return [images[start : start + per_request] for start in range(0, len(images) - per_request + 1, per_request)]


def v2_json_bodies(images: np.ndarray, per_request: int) -> list[bytes]:
    """Open Inference Protocol v2 JSON infer bodies: input `x`, UINT8, shape (n, *image shape), flat data.

    UINT8 because that is what the images are; both servers cast to float32 before onnxruntime. The same
    bytes go to oodserve and to MLServer."""
    return [
        orjson.dumps({"inputs": [{"name": "x", "shape": list(group.shape), "datatype": "UINT8", "data": group.reshape(-1).tolist()}]})
        for group in image_groups(images, per_request)
    ]


def grpc_infer_requests(images: np.ndarray, per_request: int, model: str) -> list[Any]:
    """Prebuilt KServe v2 gRPC ModelInferRequest messages (tritonclient's generated classes): input `x`, UINT8,
    as raw_input_contents (the binary form tritonclient sends)."""
    from tritonclient.grpc import service_pb2

    requests = []
    for group in image_groups(images, per_request):
        request = service_pb2.ModelInferRequest(model_name=model)
        tensor = request.inputs.add()
        tensor.name = "x"
        tensor.datatype = "UINT8"
        tensor.shape.extend(group.shape)
        request.raw_input_contents.append(np.ascontiguousarray(group, dtype=np.uint8).tobytes())
        requests.append(request)
    return requests


async def send_prepared(
    url: str,
    bodies: list[bytes],
    headers: dict[str, str],
    concurrency: int,
    requests: int,
    max_seconds: float | None = None,
) -> Outcomes:
    """`requests` POSTs of the bodies (in turn) to the full `url` with `headers` from `concurrency` workers, each on
    its own one-connection keep-alive transport (oodserve.bench.http_driver.send_requests); stops early after `max_seconds`."""
    others = {key: value for key, value in headers.items() if key.lower() != "content-type"}
    content_type = next((value for key, value in headers.items() if key.lower() == "content-type"), "application/json")
    return await send_requests(url, bodies, content_type, concurrency, requests, max_seconds=max_seconds, path="", extra_headers=others)


async def send_grpc(target: str, messages: list[Any], concurrency: int, requests: int, max_seconds: float | None = None) -> Outcomes:
    """`requests` ModelInfer calls (the prebuilt messages in turn) to `target` (host:port) from `concurrency`
    coroutines, all on one grpc.aio channel (one HTTP/2 connection carrying every call in flight, as a gRPC
    client does); stops early after `max_seconds`. An OK call counts as status 200, a failed one as a
    transport error named by its gRPC status code."""
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.max_send_message_length", 64 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def infer(worker: int, index: int) -> int:
            await stub.ModelInfer(messages[index % len(messages)], timeout=GRPC_TIMEOUT_SECONDS)
            return 200

        def transport_error(error: Exception) -> str | None:
            return f"grpc {error.code().name}" if isinstance(error, grpc.aio.AioRpcError) else None

        return await drive_workers(Outcomes(), min(concurrency, max(requests, 1)), requests, max_seconds, infer, transport_error)


def process_tree_cpu_seconds(root: int) -> float | None:
    """User + system CPU seconds so far of process `root` and all its live descendants (Linux /proc), None
    when `root` is gone. MLServer's inference workers are child processes of the server; oodserve has none."""
    stats = process_stats()
    if root not in stats:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return sum((int(stats[pid][11]) + int(stats[pid][12])) / ticks for pid in process_tree(root, stats) if pid in stats)
