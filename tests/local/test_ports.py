"""Picking a port for a server that binds later: free, and out of outgoing connections' way."""

from __future__ import annotations

import socket

import pytest

from cloudllm_serve.devhost import ports


def test_the_proxy_port_is_free_and_outside_the_ephemeral_range() -> None:
    low, high = ports.ephemeral_ports()
    assert 1024 < low < high
    picked = {ports.reserved_free_port("127.0.0.1") for _ in range(20)}
    assert all(ports.RESERVED_PORTS_FROM <= port < low for port in picked)
    assert len(picked) > 1  # random, so two launches on one host rarely pick the same
    for port in picked:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_taken_port_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setattr(ports, "RESERVED_PORTS_FROM", port)
        monkeypatch.setattr(ports, "ephemeral_ports", lambda: (port + 1, port + 2))
        assert ports.reserved_free_port("127.0.0.1") != port  # the only candidate is taken
