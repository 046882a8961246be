"""Is a TCP port free to listen on, which process holds it (Linux ``/proc``), and picking one."""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path

from cloudllm_serve.devhost.procfs import command_line

_LISTEN = "0A"  # TCP state of a listening socket in /proc/net/tcp


def can_listen(host: str, port: int) -> bool:
    """Whether a server could bind ``host:port`` now, as Serve's direct ingress binds it.

    That server does not set ``SO_REUSEADDR``, so not only a listener blocks the port but
    also connections it closed itself within the last minute (TIME_WAIT): this check
    binds the same way.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port nobody listens on right now (from the kernel's ephemeral range)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: Where :func:`reserved_free_port` looks: above Ray's worker ports (10002-19999 by
#: default), below Linux's ephemeral range (32768-60999 by default).
RESERVED_PORTS_FROM = 20000

#: How many random ports of that range :func:`reserved_free_port` tries.
RESERVED_PORT_TRIES = 200


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux's default if unknown)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def reserved_free_port(host: str) -> int:
    """A port free on ``host`` now and outside the ephemeral range, for a server that binds later.

    A port from :func:`free_port` can be taken by any outgoing connection before its
    server binds it: Ray opens hundreds while it starts, and once Serve's proxy found
    its port in use that way. A port below the ephemeral range goes only to a listener
    that asks for it by number.
    """
    candidates = range(RESERVED_PORTS_FROM, ephemeral_ports()[0])
    for port in random.sample(candidates, min(RESERVED_PORT_TRIES, len(candidates))):
        if can_listen(host, port):
            return port
    return free_port()


def _port_of(address: str) -> int:
    """The port of a ``/proc/net/tcp`` address (``0100007F:1F41``)."""
    return int(address.rsplit(":", 1)[1], 16)


def _sockets_on(port: int) -> list[tuple[str, str]]:
    """``(state, inode)`` of every TCP socket whose local port is ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and _port_of(fields[1]) == port:
                found.append((fields[3], fields[9]))
    return found


def _listening_inodes(port: int) -> set[str]:
    return {inode for state, inode in _sockets_on(port) if state == _LISTEN}


def _closing(port: int) -> bool:
    """Whether sockets on local ``port`` wait in TIME_WAIT (state 06)."""
    return any(state == "06" for state, _ in _sockets_on(port))


def port_holder(port: int) -> str | None:
    """``"pid 123 (command line)"`` of a process listening on ``port``, when it can be told.

    Reads ``/proc/net/tcp*`` and the processes' open files: a process of another user
    (without root) or another network namespace cannot be seen.
    """
    inodes = _listening_inodes(port)
    if not inodes:
        if _closing(port):
            return "connections a stopped server closed (TIME_WAIT; Linux clears them within 60 s)"
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in targets:
                    command = command_line(int(entry.name))
                    return f"pid {entry.name} ({command.strip()[:120]})"
        except OSError:
            continue
    return None


def wait_until_listenable(
    host: str, port: int, timeout_s: float, *, on_wait: Callable[[str], None] | None = None
) -> bool:
    """Poll until ``host:port`` can be bound; ``False`` when ``timeout_s`` passed first.

    ``on_wait`` is called once, with the holder's description, when the port is busy.
    """
    deadline = time.monotonic() + timeout_s
    told = False
    while not can_listen(host, port):
        if not told and on_wait is not None:
            on_wait(port_holder(port) or "a process this user cannot see")
            told = True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
    return True
