"""Every output of a bundle on 2,000 Fashion-MNIST and 1,000 MNIST test images, to show a change keeps verdicts
bit-identical: dump with the code before (a worktree of the old commit on PYTHONPATH; before the rename the package was
`service`) and after, then compare.

    .venv/bin/python -m benchmarks.verdict_dump dump models/bundles/fashion-mnist /tmp/after.npz
    PYTHONPATH=/tmp/before .venv/bin/python benchmarks/verdict_dump.py dump /tmp/before/models/bundles/fashion-mnist /tmp/before.npz
    .venv/bin/python -m benchmarks.verdict_dump compare /tmp/before.npz /tmp/after.npz

Batches of 64 for 2,816 images, then 200 single images (the lone-request path); the arrays: fused score, p-value,
verdict, class and confidence, and every signal's value and p-value.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def dump(bundle: str, out: str) -> None:
    try:
        from oodserve.datasets import load_images
        from oodserve.engine import Engine
        from oodserve.runtime.sessions import RuntimeOptions
    except ImportError:  # a tree from before the package was named oodserve
        from models.data import load_images  # type: ignore[no-redef]
        from service.engine import Engine  # type: ignore[no-redef]
        from service.runtime.sessions import RuntimeOptions  # type: ignore[no-redef]
    engine = Engine.load(bundle, RuntimeOptions())
    images = np.concatenate([load_images(FASHION_MNIST, "test").images[:2000], load_images(MNIST, "test").images[:1000]])
    batch = images[:, None].astype(np.float32)
    chunks = [batch[i : i + 64] for i in range(0, 2800, 64)] + [batch[i : i + 1] for i in range(2800, 3000)]
    parts = [engine.score(chunk) for chunk in chunks]
    arrays = {key: np.concatenate([getattr(part, key) for part in parts])
              for key in ("fused_score", "fused_p_value", "is_ood", "predicted_class", "confidence")}
    for name in parts[0].signals:
        arrays[f"signal_{name}"] = np.concatenate([part.signals[name] for part in parts])
        arrays[f"p_{name}"] = np.concatenate([part.p_values[name] for part in parts])
    np.savez(out, **arrays)
    print(f"dumped {len(arrays['is_ood'])} verdicts ({int(arrays['is_ood'].sum())} OOD) to {out}")


def compare(before: str, after: str) -> int:
    old, new = np.load(before), np.load(after)
    if sorted(old.files) != sorted(new.files):
        print(f"different arrays: {sorted(old.files)} vs {sorted(new.files)}")
        return 1
    differing = [key for key in old.files if old[key].dtype != new[key].dtype or not np.array_equal(old[key], new[key], equal_nan=True)]
    print(f"{len(old.files)} arrays of {len(old['is_ood'])} inputs compared; differing: {differing or 'none'}")
    return 1 if differing else 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "dump":
        dump(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
