"""Memory of a process and its descendants (Linux /proc), sampled in the background: how the batch
tests and benchmark measure the peak of a local run (the driver, Ray's raylet and object store, the actors)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import TracebackType

from oodserve.procfs import process_stats, process_tree

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss(pid: int) -> int:
    try:
        return int((Path("/proc") / str(pid) / "statm").read_text().split()[1]) * PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return 0


def _pss(pid: int) -> int:
    """Proportional set size: private pages plus each shared page divided by the processes mapping it, so the
    object store's shared memory, mapped by every Ray worker, is counted once across the tree (RSS when the
    kernel has no smaps_rollup)."""
    try:
        for line in (Path("/proc") / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return _rss(pid)


def process_rss(pid: int | None = None) -> int:
    """Bytes resident in process `pid` alone (default: this one), now."""
    return _rss(os.getpid() if pid is None else pid)


def process_tree_memory(pid: int | None = None) -> int:
    """Bytes of memory of process `pid` (default: this one) and all its descendants, now: the sum of their
    proportional set sizes (shared pages counted once)."""
    return sum(_pss(member) for member in process_tree(os.getpid() if pid is None else pid, process_stats()))


class PeakMemory:
    """`with PeakMemory() as peak: ...` then `peak.bytes`: the largest `process_tree_memory` seen, sampled every
    `interval` s."""

    def __init__(self, pid: int | None = None, interval: float = 0.5) -> None:
        self.pid, self.interval = pid, interval
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.bytes = max(self.bytes, process_tree_memory(self.pid))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.bytes = max(self.bytes, process_tree_memory(self.pid))
