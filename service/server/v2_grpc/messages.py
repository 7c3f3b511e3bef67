"""The KServe v2 gRPC messages, built from the compiled descriptor set `inference.binpb` (of
`inference.proto`) in a private descriptor pool: the wire format is the specification's, and a process
that also imports a client library with its own copy of package `inference` (tritonclient) sees no clash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

SERVICE_NAME = "inference.GRPCInferenceService"
DESCRIPTOR_SET = Path(__file__).with_name("inference.binpb")


def _load() -> dict[str, Any]:
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    names = ("ServerLiveRequest", "ServerLiveResponse", "ServerReadyRequest", "ServerReadyResponse", "ModelReadyRequest",
             "ModelReadyResponse", "ServerMetadataRequest", "ServerMetadataResponse", "ModelMetadataRequest",
             "ModelMetadataResponse", "ModelInferRequest", "ModelInferResponse", "InferParameter", "InferTensorContents")
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"inference.{name}")) for name in names}


MESSAGES = _load()
ServerLiveRequest = MESSAGES["ServerLiveRequest"]
ServerLiveResponse = MESSAGES["ServerLiveResponse"]
ServerReadyRequest = MESSAGES["ServerReadyRequest"]
ServerReadyResponse = MESSAGES["ServerReadyResponse"]
ModelReadyRequest = MESSAGES["ModelReadyRequest"]
ModelReadyResponse = MESSAGES["ModelReadyResponse"]
ServerMetadataRequest = MESSAGES["ServerMetadataRequest"]
ServerMetadataResponse = MESSAGES["ServerMetadataResponse"]
ModelMetadataRequest = MESSAGES["ModelMetadataRequest"]
ModelMetadataResponse = MESSAGES["ModelMetadataResponse"]
ModelInferRequest = MESSAGES["ModelInferRequest"]
ModelInferResponse = MESSAGES["ModelInferResponse"]
InferParameter = MESSAGES["InferParameter"]
