"""Shared helpers for the flow tests: tiny float64 flows with non-trivial (perturbed) weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from oodserve.models.flows.base import Flow
from oodserve.models.flows.zoo import build_flow, preset_config
from tests.helpers.data import write_idx

FAMILIES = ["nice", "glow", "nsf", "iresnet", "iresnet+l2"]
"""Flow families under test; `iresnet+l2` is the i-ResNet with attentive contractive blocks (attention "l2")."""

SMALL_IMAGE_SHAPE = (1, 4, 4)

# Exact-arithmetic settings for the i-ResNet checks: a small Lipschitz bound so the truncated
# series and the fixed-point inverse converge far below the tolerances.
IRESNET_EXACT = {"coefficient": 0.5, "inference_terms": 40, "inverse_iterations": 80}


def perturbed_flow(family: str, input_shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float64,
                   extra: dict | None = None, scale: float = 0.1) -> Flow:
    """A tiny flow of `family` after data-dependent init, with every parameter nudged away from the
    identity initialisation (zero-initialised last layers) by `scale` times Gaussian noise, in eval mode."""
    torch.manual_seed(seed)
    family, _, attention = family.partition("+")
    variant = {"attention": attention} if attention else {}
    config = {**preset_config(family, "tiny"), "input_shape": input_shape, **variant, **(extra or {})}
    flow = build_flow(family, config).to(dtype)
    flow.train()
    flow.log_prob(torch.rand(8, *input_shape, dtype=dtype) * 0.98 + 0.01)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=dtype))
    flow.eval()
    return flow


def use_exact_traces(flow: Flow) -> None:
    """Switch every residual block to the exact (basis-vector) trace."""
    for module in flow.modules():
        if hasattr(module, "use_exact_trace"):
            module.use_exact_trace()


@pytest.fixture(scope="session")
def synthetic_image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MNIST-style IDX directory of structured 28x28 images (enough for `bundle_split`)."""
    directory = tmp_path_factory.mktemp("synthetic-images")
    rng = np.random.default_rng(0)
    count = 12_400
    rows = np.arange(28)[None, :, None]
    columns = np.arange(28)[None, None, :]
    centres = rng.integers(8, 20, size=(count, 2, 1, 1))
    radius = rng.integers(4, 8, size=(count, 1, 1))
    disc = ((rows - centres[:, 0]) ** 2 + (columns - centres[:, 1]) ** 2) < radius**2
    images = np.where(disc, 200, 0) + rng.integers(0, 30, size=(count, 28, 28))
    write_idx(directory / "train-images-idx3-ubyte.gz", images, compress=True)
    write_idx(directory / "train-labels-idx1-ubyte.gz", np.zeros(count), compress=True)
    write_idx(directory / "t10k-images-idx3-ubyte.gz", images[:300], compress=True)
    write_idx(directory / "t10k-labels-idx1-ubyte.gz", np.zeros(300), compress=True)
    return directory
