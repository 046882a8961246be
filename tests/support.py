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
from typing import Any, TypeVar

import redis

from cloudllm_serve.devhost.launcher import redis_answers, redis_server_command
from cloudllm_serve.devhost.ports import can_listen, reserved_free_port


def server_port() -> int:
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

    Started by the launcher's :func:`~cloudllm_serve.devhost.launcher.redis_server_command`:
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
        extra_args: list[str] | None = None,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (make test installs it)")
        self.binary = binary
        self.data_dir = data_dir
        self.port = port or server_port()
        self.appendfsync = appendfsync
        self.maxmemory = maxmemory
        #: More ``redis-server`` arguments (replication, cluster mode).
        self.extra_args = extra_args or []
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def settings(self) -> dict[str, Any]:
        """The settings that point the service at this Redis."""
        return {"REDIS_URL": self.url}

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
            )
            + self.extra_args,
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


#: A replica's full sync starts at once (Redis waits 5 s for more replicas by default).
QUICK_SYNC = ["--repl-diskless-sync-delay", "0"]


class SentinelGroup:
    """Redis under Sentinel: a primary, a replica and three sentinels (``redis-server --sentinel``).

    The sentinels declare the primary down after ``down_after_ms`` without an answer and
    promote the replica (a quorum of two); a killed primary started again
    (:meth:`RedisServer.start`) is made a replica of the new one by the sentinels.
    """

    MASTER = "cloudllm"

    def __init__(
        self, data_dir: Path, *, down_after_ms: int = 1000, failover_timeout_ms: int = 2000
    ) -> None:
        first = RedisServer(data_dir / "redis-0", appendfsync="everysec", extra_args=QUICK_SYNC)
        second = RedisServer(
            data_dir / "redis-1",
            appendfsync="everysec",
            extra_args=[*QUICK_SYNC, "--replicaof", "127.0.0.1", str(first.port)],
        )
        self.servers = [first, second]
        self.data_dir = data_dir
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.sentinel_ports = [server_port() for _ in range(3)]
        self._sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def sentinels(self) -> str:
        """``REDIS_SENTINELS`` for this group."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    @property
    def settings(self) -> dict[str, Any]:
        """The settings that point the service at this group (``REDIS_URL``: database 0)."""
        return {
            "REDIS_URL": "redis://sentinel-named-primary/0",
            "REDIS_SENTINELS": self.sentinels,
            "REDIS_SENTINEL_MASTER": self.MASTER,
        }

    def start(self) -> None:
        for server in self.servers:
            server.start()
        for index, port in enumerate(self.sentinel_ports):
            folder = self.data_dir / f"sentinel-{index}"
            folder.mkdir(parents=True, exist_ok=True)
            config = folder / "sentinel.conf"
            primary = self.servers[0].port
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                f"sentinel monitor {self.MASTER} 127.0.0.1 {primary} 2\n"
                f"sentinel down-after-milliseconds {self.MASTER} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.MASTER} {self.failover_timeout_ms}\n"
            )
            binary = self.servers[0].binary
            self._sentinels.append(
                subprocess.Popen(
                    [binary, str(config), "--sentinel", "--logfile", str(folder / "log")],
                    stdout=subprocess.DEVNULL,
                )
            )

        def ready() -> bool:
            try:
                return all(
                    int(info["num-other-sentinels"]) == 2 and int(info["num-slaves"]) == 1
                    for info in (self._master_info(port) for port in self.sentinel_ports)
                )
            except (redis.RedisError, OSError):
                return False

        wait_for(ready, 30)
        wait_for(lambda: replicates(self.servers[1], self.servers[0]), 30)

    def _master_info(self, port: int) -> dict[str, str]:
        sentinel = redis.Redis(port=port, socket_timeout=2, decode_responses=True)
        try:
            return dict(sentinel.sentinel_master(self.MASTER))
        finally:
            sentinel.close()

    def primary(self) -> RedisServer:
        """The server the sentinels name primary now."""
        sentinel = redis.Redis(port=self.sentinel_ports[0], socket_timeout=2)
        try:
            _, port = sentinel.sentinel_get_master_addr_by_name(self.MASTER)
        finally:
            sentinel.close()
        return next(server for server in self.servers if server.port == int(port))

    def can_fail_over(self) -> bool:
        """Whether every sentinel sees the primary up and a replica it could promote.

        Sentinel promotes only a replica it sees connected, not down, with its link to the
        primary up; after a failover it learns the restarted server's state from its next
        INFO (every 10 s unless the primary is down), so a kill before that may find no
        replica to promote and the sentinels wait ``2 x failover-timeout`` to try again.
        """
        try:
            for port in self.sentinel_ports:
                sentinel = redis.Redis(port=port, socket_timeout=2, decode_responses=True)
                try:
                    master = dict(sentinel.sentinel_master(self.MASTER))
                    replicas = [dict(r) for r in sentinel.sentinel_slaves(self.MASTER)]
                finally:
                    sentinel.close()
                if master.get("flags") != "master" or not any(
                    r.get("flags") == "slave" and r.get("master-link-status") == "ok"
                    for r in replicas
                ):
                    return False
        except (redis.RedisError, OSError):
            return False
        return True

    def logs(self) -> str:
        """The end of each sentinel's log (for a failure's message)."""
        tails = []
        for index in range(len(self.sentinel_ports)):
            log = self.data_dir / f"sentinel-{index}" / "log"
            lines = log.read_text(errors="replace").splitlines() if log.exists() else []
            tails.append(f"sentinel-{index}:\n" + "\n".join(lines[-15:]))
        return "\n".join(tails)

    def restart_as_replica(self, server: RedisServer) -> None:
        """Start a stopped server as a replica of the primary the sentinels name now.

        What a supervisor that asks the sentinels at start does (e.g. the usual Helm
        charts); a server started as a primary is turned into a replica by the sentinels
        too, but only after ~10 s (they first wait for its configuration to settle).
        """
        primary = self.primary()
        server.extra_args = [*QUICK_SYNC, "--replicaof", "127.0.0.1", str(primary.port)]
        server.start()

    def replica_of(self, primary: RedisServer) -> RedisServer:
        """The other server."""
        return next(server for server in self.servers if server is not primary)

    def stop(self) -> None:
        for process in self._sentinels:
            process.terminate()
        for process in self._sentinels:
            process.wait(10)
        for server in self.servers:
            server.stop()


def replicates(server: RedisServer, primary: RedisServer) -> bool:
    """Whether ``server`` is a replica of ``primary`` with its link up."""
    try:
        info = server.client().info("replication")
    except (redis.RedisError, OSError):
        return False
    return (
        info.get("role") == "slave"
        and int(info.get("master_port", 0)) == primary.port
        and info.get("master_link_status") == "up"
    )


def cluster_node_port() -> int:
    """A free port for a cluster node whose bus port (the port + 10000) is free too."""
    while True:
        port = server_port()
        if port + 10000 <= 65535 and can_listen("127.0.0.1", port + 10000):
            return port


class RedisClusterNodes:
    """A Redis Cluster of ``primaries`` primaries, each with one replica, made by ``redis-cli``.

    A primary that stops answering for ``node_timeout_ms`` is replaced by its replica.
    """

    def __init__(self, data_dir: Path, *, primaries: int = 3, node_timeout_ms: int = 1000) -> None:
        args = [*QUICK_SYNC, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        args += ["--cluster-node-timeout", str(node_timeout_ms)]
        self.servers = [
            RedisServer(
                data_dir / f"node-{index}",
                cluster_node_port(),
                appendfsync="everysec",
                extra_args=args,
            )
            for index in range(2 * primaries)
        ]

    @property
    def url(self) -> str:
        """``REDIS_URL`` for this cluster (a seed node; with ``REDIS_CLUSTER=true``)."""
        return self.servers[0].url

    @property
    def settings(self) -> dict[str, Any]:
        """The settings that point the service at this cluster."""
        return {"REDIS_URL": self.url, "REDIS_CLUSTER": True}

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(
            host="127.0.0.1", port=self.servers[0].port, socket_timeout=2, decode_responses=True
        )

    def start(self) -> None:
        for server in self.servers:
            server.start()
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not installed (make test installs redis-server)")
        subprocess.run(
            [cli, "--cluster", "create"]
            + [f"127.0.0.1:{server.port}" for server in self.servers]
            + ["--cluster-replicas", "1", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        wait_for(self.healthy, 30)

    def healthy(self) -> bool:
        """Every node answering says the cluster is ``ok`` and every replica's link is up."""
        for server in self.servers:
            if server.process is None or server.process.poll() is not None:
                continue
            try:
                client = server.client()
                if client.cluster("info")["cluster_state"] != "ok":
                    return False
                replication = client.info("replication")
            except (redis.RedisError, OSError):
                return False
            if replication["role"] == "slave" and replication["master_link_status"] != "up":
                return False
        return True

    def server_of(self, key: str, *, primary: bool = True) -> RedisServer:
        """The primary holding ``key``'s slot now (or its replica)."""
        client = self.client()
        try:
            node = client.get_node_from_key(key, replica=not primary)
        finally:
            client.close()
        assert node is not None
        return next(server for server in self.servers if server.port == int(node.port))

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


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
