"""Process trees from Linux /proc: the load tools' CPU accounting of a server with worker processes and the batch
scorer's memory peak of a local Ray run both walk a process and its descendants."""

from __future__ import annotations

from pathlib import Path


def process_stats() -> dict[int, list[str]]:
    """pid -> the fields of /proc/PID/stat after the command name (index 1 is the parent pid, 11 and 12 user and
    system clock ticks), for every process visible now; processes that exit meanwhile are left out."""
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stats[int(entry.name)] = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
    return stats


def process_tree(root: int, stats: dict[int, list[str]]) -> list[int]:
    """`root` and every descendant of it in `stats` (depth first)."""
    children: dict[int, list[int]] = {}
    for pid, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(pid)
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, []))
    return tree
