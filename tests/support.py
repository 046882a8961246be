"""Helpers shared by the tests: a real redis-server we control, free ports, polling."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import redis

from cloudllm_serve.launcher import redis_answers, redis_server_command
from cloudllm_serve.ports import reserved_free_port


def free_port() -> int:
    """A free port for a server a test starts later, outside the ephemeral range.

    A port from ``bind(0)`` can be taken by an outgoing connection (Ray opens hundreds)
    before the server binds it: a start-up test's ``LLM_PORT`` once was, in ``make test``.
    """
    return reserved_free_port("127.0.0.1")


T = TypeVar("T")


def wait_for(check: Callable[[], T | None], timeout_s: float, interval_s: float = 0.1) -> T:
    """Call ``check`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)


class RedisServer:
    """A real ``redis-server`` on a free port that tests may stop, freeze and restart.

    Started by the launcher's :func:`~cloudllm_serve.launcher.redis_server_command`:
    data is kept in an append-only file only, synced per ``appendfsync``: ``always``
    (every write) unless asked otherwise, ``REDIS_APPENDFSYNC`` for the policy
    ``make serve`` runs (also ``always``). A SIGKILL loses nothing Redis acknowledged
    (docs/deployment.md, "Redis"). A restart
    (:meth:`start` again) keeps the port and the data.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        appendfsync: str = "always",
        maxmemory: str = "0",
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (make test installs it)")
        self.binary = binary
        self.data_dir = data_dir
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.maxmemory = maxmemory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, decode_responses=True)

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            redis_server_command(
                self.binary,
                "127.0.0.1",
                self.port,
                self.data_dir,
                appendfsync=self.appendfsync,
                maxmemory=self.maxmemory,
            ),
            stdout=subprocess.DEVNULL,
        )
        wait_for(self._answers, 10)

    def _answers(self) -> bool:
        return redis_answers("127.0.0.1", self.port)

    def kill(self) -> None:
        """SIGKILL: the harshest stop."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def freeze(self) -> None:
        """SIGSTOP: the socket stays open but nothing answers."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.terminate()
            self.process.wait(10)


def image_bytes(width: int, height: int, *, seed: int = 0, image_format: str = "PNG") -> bytes:
    """A small test picture: a solid colour chosen by ``seed`` with a few random dots."""
    import io
    import random

    from PIL import Image

    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(min(50, width * height)):
        spot = (rng.randrange(width), rng.randrange(height))
        image.putpixel(spot, tuple(rng.randrange(256) for _ in range(3)))
    out = io.BytesIO()
    image.save(out, format=image_format)
    return out.getvalue()


def data_url(data: bytes, mime_type: str = "image/png") -> str:
    """``data`` as a base64 data URL."""
    import base64

    return f"data:{mime_type};base64,{base64.b64encode(data).decode()}"


class MediaServer:
    """A loopback HTTP server for remote-image tests, in a thread of this process.

    ``/image.png`` the picture; ``/redirect?to=URL`` a 302 to URL; ``/slow`` waits
    ``slow_s`` before answering; ``/big`` sends ``big_bytes`` bytes.
    """

    def __init__(self, picture: bytes, *, slow_s: float = 5.0, big_bytes: int = 0) -> None:
        import http.server
        import threading
        import urllib.parse

        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                path, _, query = self.path.partition("?")
                server.requests.append(path)
                server.hosts.append(self.headers.get("Host", ""))
                if path == "/redirect":
                    target = urllib.parse.parse_qs(query)["to"][0]
                    self.send_response(302)
                    self.send_header("Location", target)
                    self.end_headers()
                    return
                if path == "/slow":
                    time.sleep(server.slow_s)
                body = picture if path in ("/image.png", "/slow") else b""
                if path == "/big":
                    body = b"\0" * server.big_bytes
                if not body:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()  # no Content-Length: the reader must count
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(body)

        self.slow_s = slow_s
        self.big_bytes = big_bytes
        self.requests: list[str] = []
        #: The Host header of each request, in order.
        self.hosts: list[str] = []
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        """The URL of ``path`` on this server through ``host``."""
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        """Stop serving."""
        self._httpd.shutdown()
        self._httpd.server_close()


#: A Prometheus text line: name, labels, value.
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Sample = tuple[str, dict[str, str], float]


def scrape_metrics(metrics_url: str) -> list[Sample]:
    """Every sample a Prometheus endpoint (Ray's metrics agent) exports now."""
    import requests

    text = requests.get(f"{metrics_url}/metrics", timeout=10).text
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            labels = dict(_LABEL.findall(match.group(2) or ""))
            samples.append((match.group(1), labels, float(match.group(3))))
    return samples


def metric_total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(
        value
        for sample, have, value in samples
        if sample == name and all(have.get(k) == v for k, v in labels.items())
    )
