"""Time-bounded training with early stopping: the loop state the small trainers of `oodserve fit` share."""

from __future__ import annotations

import copy
import math
import time

from torch import nn
from tqdm import tqdm


class TimedEarlyStopping:
    """Train epochs until `seconds` pass or the validation metric has not improved for `patience` epochs;
    keeps the best weights of `module` and shows a progress bar over the time budget.

        stopping = TimedEarlyStopping(model, seconds, patience, higher_is_better=False, description="flow")
        while stopping.keep_going():
            ...one epoch, checking stopping.out_of_time() between batches...
            stopping.end_epoch(validation_metric, "validation nll 1.23")
        stopping.restore_best()
    """

    def __init__(self, module: nn.Module, seconds: float, patience: int, higher_is_better: bool, description: str,
                 min_delta: float = 1e-4) -> None:
        self.module, self.seconds, self.patience = module, seconds, patience
        self.sign = 1.0 if higher_is_better else -1.0
        self.min_delta = min_delta
        self.started = time.monotonic()
        self.best_state = copy.deepcopy(module.state_dict())
        self.best = -math.inf
        self.stale = 0
        self.epochs = 0
        self.bar = tqdm(total=max(seconds, 1e-3), desc=description, leave=False, bar_format="{desc}: {percentage:3.0f}% |{bar}| {postfix}")

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def out_of_time(self) -> bool:
        return self.elapsed() > self.seconds

    def keep_going(self) -> bool:
        return not self.out_of_time() and self.stale < self.patience

    def end_epoch(self, metric: float, postfix: str) -> None:
        """Record one epoch's validation metric; keep the weights when it improved by more than min_delta."""
        self.epochs += 1
        if self.sign * metric > self.best + self.min_delta:
            self.best, self.stale = self.sign * metric, 0
            self.best_state = copy.deepcopy(self.module.state_dict())
        else:
            self.stale += 1
        self.bar.n = min(self.elapsed(), self.seconds)
        self.bar.set_postfix_str(f"epoch {self.epochs}, {postfix}")
        self.bar.refresh()

    def restore_best(self) -> float:
        """Load the best weights back into the module; returns the best metric."""
        self.bar.close()
        self.module.load_state_dict(self.best_state)
        return self.sign * self.best
