"""An MLServer custom runtime that runs the ONNX files of an oodserve bundle with onnxruntime and answers
their raw outputs: the peer-server row of the comparison in `oodserve.bench.peers.compare`.

What it computes is what oodserve's ModelRunner computes for the same request: input `x` (UINT8 or FP32,
shape (N, *input shape)) cast to float32 on the raw 0..255 scale, every model of the bundle's manifest run
on it, one intra-op thread per session, with the same graph optimisation level as oodserve's sessions.
What it does not do is oodserve's scoring (conformal p-values, fusion, drift): it answers every output
tensor of every model as it came out of onnxruntime, named `MODEL.OUTPUT` (e.g. `flow.log_prob`), so a
client could score them itself. That is the work any model server has to do for this bundle.

Imported by MLServer (in its own venv, service/bench/peers/mlserver/install.sh) as the top-level module
`runtime`, from the folder of model-settings.json; it needs only mlserver, onnxruntime and numpy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import InferenceError
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri

INPUT_NAME = "x"
"""The one input of every bundle model (oodserve's ONNX input name convention)."""
ACCEPTED_DATATYPES = ("UINT8", "FP32")


def bundle_session(path: Path) -> onnxruntime.InferenceSession:
    """One CPU session for an ONNX file with oodserve's session options: one intra-op thread (the server's
    workers run side by side instead), full graph optimisation, no busy-waiting pool threads."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


class BundleOnnxRuntime(MLModel):
    """Every model of one bundle (parameters.uri: the bundle folder with manifest.json) behind one v2 model."""

    async def load(self) -> bool:
        """Open one session per manifest model, in manifest order (the order oodserve runs them in)."""
        folder = Path(await get_model_uri(self._settings))
        manifest = json.loads((folder / "manifest.json").read_text())
        self._input_shape = [int(dim) for dim in manifest["input"]["shape"]]
        self._sessions = {name: bundle_session(folder / spec["file"]) for name, spec in manifest["models"].items()}
        for name, session in self._sessions.items():
            inputs = [node.name for node in session.get_inputs()]
            if inputs != [INPUT_NAME]:
                raise ValueError(f"model {name!r} has inputs {inputs}; this runtime feeds one input named {INPUT_NAME!r}")
        self._output_names = {name: [node.name for node in session.get_outputs()] for name, session in self._sessions.items()}
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        """Decode input `x`, run every session on it in turn, answer every output tensor raw.

        Runs on the worker's event loop, as MLServer's own runtimes (sklearn, xgboost) do; with adaptive
        batching `payload` holds the requests merged along the first axis and MLServer splits the answer.
        """
        tensors = [tensor for tensor in payload.inputs if tensor.name == INPUT_NAME]
        if len(tensors) != 1:
            raise InferenceError(f"expected one input named {INPUT_NAME!r}, got {[tensor.name for tensor in payload.inputs]}")
        tensor = tensors[0]
        if tensor.datatype not in ACCEPTED_DATATYPES:
            raise InferenceError(f"input {INPUT_NAME!r} must be one of {ACCEPTED_DATATYPES}, got {tensor.datatype}")
        if list(tensor.shape[1:]) != self._input_shape:
            raise InferenceError(f"input {INPUT_NAME!r} must have shape [N, {', '.join(map(str, self._input_shape))}], got {tensor.shape}")
        batch = np.ascontiguousarray(NumpyCodec.decode_input(tensor), dtype=np.float32)
        outputs = []
        for name, session in self._sessions.items():
            arrays = session.run(None, {INPUT_NAME: batch})
            for output_name, array in zip(self._output_names[name], arrays):
                outputs.append(NumpyCodec.encode_output(f"{name}.{output_name}", np.asarray(array)))
        return InferenceResponse(model_name=self.name, model_version=self.version, id=payload.id, outputs=outputs)
