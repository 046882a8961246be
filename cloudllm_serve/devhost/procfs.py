"""What Linux's ``/proc`` says of a process: its name, command line, threads, children.

Each function answers "" or [] for a process that has gone, that this user may not
read, or on a system without ``/proc``.
"""

from __future__ import annotations

import os
from pathlib import Path


def process_name(pid: int) -> str:
    """The process's name as ``ps`` shows it (its title, cut at 15 characters), or ""."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def command_line(pid: int) -> str:
    """The process's command line, its arguments joined by spaces, or ""."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def children(pid: int) -> list[int]:
    """The process's direct children."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def threads(pid: int) -> list[int]:
    """The process's thread ids."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def descendants(root: int) -> list[int]:
    """``root`` and every process under it."""
    every = [root]
    for pid in every:
        every += children(pid)
    return every


def start_time(pid: int) -> str:
    """When the process started (clock ticks since boot, as text); "" once gone or a zombie.

    With the pid, an identity that a reused pid does not share.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat[stat.rindex(")") + 2 :].split()  # after the name, which may hold spaces
    if fields[0] in ("Z", "X"):
        return ""
    return fields[19]
