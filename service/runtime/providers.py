"""Choosing onnxruntime execution providers: CUDA first where available, then CPU; optional GPU requirement."""

from __future__ import annotations

import logging
from collections.abc import Sequence

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
DEFAULT_PROVIDER_ORDER = (CUDA_PROVIDER, CPU_PROVIDER)

logger = logging.getLogger("oodserve.runtime")


class GpuRequiredError(RuntimeError):
    """OODSERVE_REQUIRE_GPU=true but the CUDA execution provider is not available or not active."""


def available_providers() -> list[str]:
    """Providers compiled into the installed onnxruntime (onnxruntime or onnxruntime-gpu)."""
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def resolve_providers(requested: Sequence[str] | None, available: Sequence[str], require_gpu: bool) -> list[str]:
    """The provider list to hand to onnxruntime.

    requested None -> DEFAULT_PROVIDER_ORDER filtered to what is available. Requested providers
    that are not available are dropped with a warning; CPU is always appended as the last resort
    unless the GPU is required. require_gpu with no CUDA provider raises GpuRequiredError.
    """
    wanted = list(requested) if requested else list(DEFAULT_PROVIDER_ORDER)
    unavailable = [provider for provider in wanted if provider not in available]
    if unavailable and requested:
        logger.warning("execution providers %s are not available (available: %s); skipping them", unavailable, list(available))
    chosen = [provider for provider in wanted if provider in available]
    if require_gpu:
        if CUDA_PROVIDER not in chosen:
            raise GpuRequiredError(
                f"OODSERVE_REQUIRE_GPU=true but {CUDA_PROVIDER} is not available "
                f"(available: {list(available)}; install the `gpu` extra, onnxruntime-gpu, on a CUDA machine)"
            )
        return chosen
    if CPU_PROVIDER not in chosen and CPU_PROVIDER in available:
        chosen.append(CPU_PROVIDER)
    return chosen
