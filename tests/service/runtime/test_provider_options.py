"""CUDA execution-provider options (TF32, cuDNN algorithm search) reach onnxruntime for the CUDA provider only."""

from __future__ import annotations

import pytest

from oodserve.config import Settings
from oodserve.runtime.providers import CPU_PROVIDER, CUDA_PROVIDER
from oodserve.runtime.sessions import RuntimeOptions, provider_entries


def test_cuda_options_attach_to_the_cuda_provider_only() -> None:
    options = (("cudnn_conv_algo_search", "DEFAULT"), ("use_tf32", "0"))
    assert provider_entries([CUDA_PROVIDER, CPU_PROVIDER], options) == [
        (CUDA_PROVIDER, {"cudnn_conv_algo_search": "DEFAULT", "use_tf32": "0"}),
        CPU_PROVIDER,
    ]
    assert provider_entries([CUDA_PROVIDER, CPU_PROVIDER], ()) == [CUDA_PROVIDER, CPU_PROVIDER]
    assert provider_entries([CPU_PROVIDER], options) == [CPU_PROVIDER]


def test_settings_read_the_options_as_a_json_object(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OODSERVE_CUDA_PROVIDER_OPTIONS", '{"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}')
    assert RuntimeOptions.from_settings(Settings()).cuda_provider_options == (("cudnn_conv_algo_search", "HEURISTIC"), ("use_tf32", "0"))
    monkeypatch.setenv("OODSERVE_CUDA_PROVIDER_OPTIONS", "[1, 2]")
    with pytest.raises(ValueError):
        Settings()
