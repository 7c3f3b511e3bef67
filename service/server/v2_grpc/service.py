"""KServe v2 gRPC inference (`inference.GRPCInferenceService`), served by `grpc.aio` on the HTTP server's
event loop beside it: the same engines, dynamic batching, API keys, size limits, drift streams and metrics.

- ServerLive, ServerReady, ServerMetadata: open, like the HTTP health routes;
- ModelReady, ModelMetadata, ModelInfer: behind `OODSERVE_API_KEYS` (metadata `authorization: Bearer KEY`);
- ModelInfer takes one input `x` (UINT8 or FP32, shape (N, *input shape)) as `raw_input_contents` or typed
  `contents`, the request parameter `alpha`, and metadata `x-ood-stream`; it answers the same output tensors
  as v2 HTTP (verdict, fused p-value and score, every signal, class index), always as `raw_output_contents`.

Errors map to status codes from the HTTP status of the same failure: 400/422 INVALID_ARGUMENT, 401
UNAUTHENTICATED, 403 PERMISSION_DENIED, 404 NOT_FOUND, 409 ABORTED, 413 RESOURCE_EXHAUSTED (and messages above
OODSERVE_MAX_BODY_BYTES, refused by gRPC itself), 503 UNAVAILABLE, 504 DEADLINE_EXCEEDED, anything else INTERNAL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np

from oodserve import __version__
from oodserve.engine import Engine, NotReadyError, UnknownModelError
from oodserve.scoring.arrays import check_image_array
from oodserve.server.errors import ApiError, as_api_error
from oodserve.server.state import AppState
from oodserve.server.v2.codec import (
    INPUT_NAME,
    InferRequest,
    RequestedOutput,
    alpha_parameter,
    check_output_name,
    input_count,
    input_dtype,
    model_metadata,
    output_arrays,
    output_specs,
    raw_tensor,
    typed_tensor,
)
from oodserve.server.v2_grpc import messages

logger = logging.getLogger("oodserve.grpc")

STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
TYPED_CONTENTS = {"UINT8": "uint_contents", "FP32": "fp32_contents"}


def status_code_for(error: ApiError) -> grpc.StatusCode:
    return STATUS_CODES.get(error.status_code, grpc.StatusCode.INTERNAL)


def _bad(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def parameter_value(parameter: Any) -> Any:
    """The value of an InferParameter's oneof, or None when unset."""
    choice = parameter.WhichOneof("parameter_choice")
    return None if choice is None else getattr(parameter, choice)


def parse_model_infer(request: Any, engine: Engine, max_instances: int) -> InferRequest:
    """ModelInferRequest -> validated images (N, *input shape) float32, alpha and requested outputs (400 on any problem)."""
    spec = engine.manifest.input
    unknown = sorted(key for key in request.parameters if key != "alpha")
    if unknown:
        raise _bad(f"unknown request parameters {unknown}; the one parameter is `alpha`")
    alpha = alpha_parameter(parameter_value(request.parameters["alpha"]), text_allowed=True) if "alpha" in request.parameters else None
    if len(request.inputs) != 1:
        raise _bad(f"`inputs` must hold exactly one tensor named {INPUT_NAME!r}, got {len(request.inputs)}")
    tensor = request.inputs[0]
    dtype = input_dtype(tensor.name, tensor.datatype)
    shape = list(tensor.shape)
    count = input_count(shape, spec, max_instances)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise _bad(f"raw_input_contents must hold one entry per input (1), got {len(request.raw_input_contents)}")
        if tensor.HasField("contents"):
            raise _bad("the input has both `contents` and raw_input_contents; send one")
        values = raw_tensor(request.raw_input_contents[0], dtype, count, f"input of shape {shape} and datatype {tensor.datatype}")
    else:
        typed = getattr(tensor.contents, TYPED_CONTENTS[tensor.datatype])
        if len(typed) != count:
            raise _bad(f"input shape {shape} holds {count} values but contents.{TYPED_CONTENTS[tensor.datatype]} has {len(typed)}")
        values = typed_tensor(np.asarray(typed, dtype=np.float64 if tensor.datatype == "FP32" else np.int64), tensor.datatype)
    images = check_image_array(values.reshape(shape), spec.shape, spec.dtype, spec.min, spec.max, max_instances)
    available = [name for name, _ in output_specs(engine)]
    outputs = tuple(RequestedOutput(check_output_name(output.name, available), True) for output in request.outputs) or None
    return InferRequest(request.id or None, images, alpha, outputs, True)


class InferenceService:
    """The RPC handlers over one app's state (engines, batching, settings, metrics, drift)."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    # ---- helpers ----

    def _check_key(self, context: grpc.aio.ServicerContext) -> dict[str, Any]:
        """The call's metadata, once the bearer token in it passed the data plane's key check."""
        metadata = dict(context.invocation_metadata() or ())
        scheme, _, token = str(metadata.get("authorization", "")).partition(" ")
        presented = token.strip() if scheme.lower() == "bearer" else None
        self.state.plane.authorize(presented, "api", asked_by="RPC", how="send metadata `authorization: Bearer KEY`")
        return metadata

    def _engine(self, name: str, version: str) -> Engine:
        return self.state.plane.model(name, version or None)

    # ---- RPCs ----

    async def server_live(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return messages.ServerLiveResponse(live=True)

    async def server_ready(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return messages.ServerReadyResponse(ready=self.state.ready and self.state.registry is not None)

    async def server_metadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return messages.ServerMetadataResponse(name="oodserve", version=__version__, extensions=[])

    async def model_ready(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._check_key(context)
        try:
            self._engine(request.name, request.version)
        except (UnknownModelError, NotReadyError):
            return messages.ModelReadyResponse(ready=False)
        return messages.ModelReadyResponse(ready=True)

    async def model_metadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._check_key(context)
        metadata = model_metadata(self._engine(request.name, request.version))
        response = messages.ModelMetadataResponse(name=metadata["name"], versions=metadata["versions"], platform=metadata["platform"])
        for tensor in metadata["inputs"]:
            response.inputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        for tensor in metadata["outputs"]:
            response.outputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        return response

    async def model_infer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        metadata = self._check_key(context)
        engine = self._engine(request.model_name, request.model_version)

        async def decode() -> InferRequest:
            return parse_model_infer(request, engine, self.state.settings.max_batch_instances)

        parsed, scores = await self.state.plane.score(engine, metadata.get("x-ood-stream"), decode)
        arrays = output_arrays(engine, scores)
        names = [output.name for output in parsed.outputs] if parsed.outputs is not None else list(arrays)
        response = messages.ModelInferResponse(model_name=engine.name, model_version=engine.version, id=request.id)
        response.parameters["alpha"].double_param = scores.alpha
        for name in names:
            datatype, values = arrays[name]
            response.outputs.add(name=name, datatype=datatype, shape=[int(values.shape[0])])
            response.raw_output_contents.append(values.tobytes())
        return response


def _guarded(state: AppState, method: str, handler: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]) -> Callable[..., Any]:
    """Run `handler`; turn ApiError and domain errors into gRPC status codes, count every call by method and code."""

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await handler(request, context)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED  # the client went away or its deadline passed
            raise
        except Exception as error:
            try:
                api_error = as_api_error(error)
            except TypeError:
                logger.exception("unhandled error in gRPC %s", method)
                api_error = ApiError(500, "internal_error", "the server failed to handle this request; see the service log")
            code = status_code_for(api_error)
            await context.abort(code, f"{api_error.code}: {api_error}")
        finally:
            state.metrics.observe_grpc(method, code.name, time.perf_counter() - started)

    return call


def service_handler(state: AppState) -> grpc.GenericRpcHandler:
    """The generic handler serving every RPC of `inference.GRPCInferenceService`."""
    service = InferenceService(state)
    table = {
        "ServerLive": (service.server_live, messages.ServerLiveRequest, messages.ServerLiveResponse),
        "ServerReady": (service.server_ready, messages.ServerReadyRequest, messages.ServerReadyResponse),
        "ServerMetadata": (service.server_metadata, messages.ServerMetadataRequest, messages.ServerMetadataResponse),
        "ModelReady": (service.model_ready, messages.ModelReadyRequest, messages.ModelReadyResponse),
        "ModelMetadata": (service.model_metadata, messages.ModelMetadataRequest, messages.ModelMetadataResponse),
        "ModelInfer": (service.model_infer, messages.ModelInferRequest, messages.ModelInferResponse),
    }
    handlers = {
        method: grpc.unary_unary_rpc_method_handler(
            _guarded(state, method, handler),
            request_deserializer=request_type.FromString,
            response_serializer=response_type.SerializeToString,
        )
        for method, (handler, request_type, response_type) in table.items()
    }
    return grpc.method_handlers_generic_handler(messages.SERVICE_NAME, handlers)


async def start_grpc_server(state: AppState, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC server on host:port (0 = any free port) on the running event loop; returns it and its port."""
    limit = state.settings.max_body_bytes
    server = grpc.aio.server(maximum_concurrent_rpcs=state.settings.max_concurrent_connections, options=[
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", max(limit, 64 * 1024 * 1024)),
        ("grpc.so_reuseport", 0),
    ])
    server.add_generic_rpc_handlers((service_handler(state),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot bind the gRPC port {host}:{port}")
    await server.start()
    logger.info("gRPC (KServe v2) serving on %s:%d", host, bound)
    return server, bound
