"""What the watchdog needs to know about a local process before it kills it (Linux /proc)."""

from __future__ import annotations

import os


def start_ticks(pid: int) -> int:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22); 0 if unknown.
    With the pid, it names one process: a later process that reuses the pid has another value."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    fields = stat[stat.rfind(b")") + 2 :].split()  # the command name may hold spaces and parens
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return 0


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def is_stage_process(pid: int, kind: str, name: str, ticks: int) -> bool:
    """True when `pid` is the process `python -m stages.<kind> --name <name>` that started at `ticks`."""
    if pid <= 0 or pid == os.getpid() or not ticks or start_ticks(pid) != ticks:
        return False
    args = cmdline(pid)
    try:
        return args[args.index("-m") + 1] == f"stages.{kind}" and args[args.index("--name") + 1] == name
    except (ValueError, IndexError):
        return False
