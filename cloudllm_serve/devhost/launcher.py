"""``make serve``: start Redis (if asked) and the Serve app from a deployment profile.

    python -m cloudllm_serve.devhost.launcher --profile deployments/cpu.yaml --start-redis

Steps, each printed as it happens:

1. validate the settings (a bad variable stops here, exit status 2);
2. prepare the default model when it is the one configured and missing;
3. check that ``LLM_PORT`` can be bound; if not, say by whom and wait up to
   ``--port-wait-s`` (75 s), then stop with an error naming the port;
4. with ``--start-redis``, start ``redis-server`` on ``REDIS_URL``'s port unless one
   already answers there (data under ``~/.cache/cloudllm-serve/redis``);
5. write the profile with ``http_options`` set from ``LLM_HOST``/``LLM_PORT`` and run
   ``serve run`` on it (a local Ray cluster);
6. wait until ``/health`` answers 200, then keep running. If Serve logs that its HTTP
   server could not bind ``LLM_PORT`` (taken after step 3: with direct ingress Ray then
   moves to the next port for good), stop Serve and start it again once the port is free.
   A replica failing in its constructor is printed by ``serve_run`` (its exception); when
   Serve gives up on the application, ``serve run`` exits 1 and so does the launcher.

Ctrl-C, SIGTERM or SIGHUP stops ``serve run`` (and its Ray cluster) and the Redis it
started, then whatever else it started that is still running (:class:`Shutdown`: a
further signal only hurries the stop), and returns once ``LLM_PORT`` can be bound again
(a stop followed by a start works).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlparse

import yaml

from cloudllm_serve.devhost.ports import reserved_free_port, wait_until_listenable
from cloudllm_serve.devhost.prepare_models import prepare
from cloudllm_serve.devhost.procfs import children, command_line, descendants, start_time
from cloudllm_serve.devhost.settings import PROFILE_SECTION, HostSettings
from cloudllm_serve.engine.vllm_engine import check_engine_kwargs
from cloudllm_serve.errors import SettingsError
from cloudllm_serve.local_models import cache_root, default_model_dir, is_prepared
from cloudllm_serve.placement import ENGINE_DEPLOYMENT, refused_overrides
from cloudllm_serve.settings import Settings, load_settings

STARTUP_TIMEOUT_S = 900.0
#: How long a busy LLM_PORT is waited for, at start and after a stop: a little more than
#: Linux's TIME_WAIT (60 s), which keeps the port of a stopped server from being bound
#: again by Serve's direct ingress (it binds without SO_REUSEADDR).
PORT_WAIT_S = 75.0
#: How often Serve is restarted when its HTTP server lost the race for LLM_PORT.
BIND_RESTARTS = 3
#: What Serve's replica (direct ingress) or proxy logs when it cannot bind its port.
BIND_FAILURES = (
    "Failed to start RequestProtocol.HTTP server on port",
    "Failed to start proxy HTTP server",
)
#: How the GCS server of a Ray cluster names the cluster's session folder.
SESSION_DIR_FLAG = "--session-dir="


def say(message: str) -> None:
    """Print a launcher line."""
    print(f"[cloudllm] {message}", flush=True)


class Stopped(Exception):
    """SIGINT, SIGTERM or SIGHUP arrived while the launcher waited."""


#: The signals that stop the launcher (SIGHUP: the terminal closed).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: A stop signal this soon after the first is the same stop, not a hurry: a SIGTERM to
#: ``make serve``'s process group reaches the launcher twice (directly, and forwarded by
#: make).
SAME_STOP_S = 1.0
#: How long each remaining wait of a stop lasts once a later signal hurried it (then
#: what still runs gets SIGKILL).
HURRIED_WAIT_S = 2.0
#: How long the processes left under the launcher after Serve and Redis stopped (Ray's
#: workers, vLLM's engine) get to exit before SIGKILL.
LEFTOVER_WAIT_S = 10.0
#: How often a stop looks whether what it waits for has exited.
STOP_POLL_S = 0.05


class Shutdown:
    """The launcher's stop signals: the first starts the stop, later ones only hurry it.

    The handler raises :class:`Stopped` only inside :meth:`interruptible` blocks (waits
    that start nothing), never while a process is being started or stopped: otherwise it
    records the signal, and the next :meth:`interruptible` block raises. So a process is
    always tracked once started, and the clean-up cannot be interrupted into leaving
    one behind: a signal during it (after :data:`SAME_STOP_S`) shortens its remaining
    waits to :data:`HURRIED_WAIT_S`.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self.first_at = 0.0
        self.hurried_at: float | None = None
        self._interruptible = False
        self._announced = False

    def install(self) -> None:
        """Handle :data:`STOP_SIGNALS` with :meth:`on_signal`."""
        for stop_signal in STOP_SIGNALS:
            signal.signal(stop_signal, self.on_signal)

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        """Record the signal; raise :class:`Stopped` if it is the first, during a wait."""
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.reason is None:
            self.reason, self.first_at = name, now
            if self._interruptible:
                self._interruptible = False
                raise Stopped(name)
        elif self.hurried_at is None and now - self.first_at >= SAME_STOP_S:
            # Nothing printed here: a print while the main thread prints raises.
            self.hurried_at = now

    def announce_hurry(self) -> None:
        """Say once that the stop was hurried (outside the handler)."""
        if self.hurried_at is not None and not self._announced:
            self._announced = True
            say(f"stop signal again: hurrying the stop (SIGKILL after {HURRIED_WAIT_S:.0f} s)")

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A wait that the first stop signal ends with :class:`Stopped`."""
        self._interruptible = True  # before the check: a signal between them raises
        try:
            if self.reason is not None:
                raise Stopped(self.reason)
            yield
        finally:
            self._interruptible = False

    def deadline(self, deadline: float) -> float:
        """``deadline`` (monotonic), or sooner when the stop was hurried."""
        if self.hurried_at is None:
            return deadline
        return min(deadline, self.hurried_at + HURRIED_WAIT_S)


def load_profile(path: Path) -> dict[str, Any]:
    """Read a Serve config file."""
    with path.open() as handle:
        profile = yaml.safe_load(handle)
    if not isinstance(profile, dict) or not profile.get("applications"):
        raise SettingsError(f"{path} is not a Serve config with 'applications'")
    return profile


def profile_settings(profile: dict[str, Any]) -> Settings:
    """Validate the settings the profile's first application will get.

    Also refuses engine deployment options that the settings derive (bundles,
    autoscaling, queue bound...): in a config they would silently replace a setting.
    """
    application = profile["applications"][0]
    for deployment in application.get("deployments") or []:
        if deployment.get("name") != ENGINE_DEPLOYMENT:
            continue
        refused = refused_overrides(deployment)
        if refused:
            raise SettingsError(
                f"the {ENGINE_DEPLOYMENT} entry sets {', '.join(refused)}, which are derived "
                "from the settings in code (VLLM_TENSOR_PARALLEL_SIZE, ENGINE_MIN_REPLICAS, "
                "ENGINE_MAX_REPLICAS, ENGINE_MAX_QUEUED_REQUESTS, ...): remove them and set "
                "the variables instead (docs/deployment.md)"
            )
    settings = load_settings(application.get("args") or {})
    check_engine_kwargs(settings)
    return settings


def render_profile(
    profile: dict[str, Any], settings: Settings, proxy_port: int | None = None
) -> dict[str, Any]:
    """The profile with the HTTP address taken from ``LLM_HOST``/``LLM_PORT``.

    With direct ingress, Serve's proxy moves to ``proxy_port`` and ``LLM_PORT`` is the
    ingress replica's own (see :func:`serve_environment`).
    """
    rendered = {k: v for k, v in profile.items() if k != PROFILE_SECTION}
    rendered["http_options"] = {
        **(profile.get("http_options") or {}),
        "host": settings.LLM_HOST,
        "port": proxy_port or settings.LLM_PORT,
    }
    return rendered


#: Ray Serve settings that cut per-request and per-token latency (measured with
#: ``make bench``: about 7 ms of TTFT at concurrency 1 on top of direct ingress). They
#: are part of Ray's own "throughput optimized" preset: user code and the request router
#: share the replica's event loop instead of hopping threads, handles talk gRPC, and
#: request-path logs are buffered.
LATENCY_TUNING = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
}


#: The environment of a local Ray cluster whose node address is 127.0.0.1, so that Ray's
#: metrics agent listens there only (``METRICS_EXPORT_HOST=127.0.0.1``): Ray binds the
#: agent to all interfaces unless the node's address is a loopback one, and ``ray.init``
#: replaces a loopback ``_node_ip_address`` by the machine's address unless clusters are
#: off (Ray's switch for its local-only macOS/Windows mode; a one-machine cluster loses
#: nothing). vLLM's own address must match the node's (a tensor-parallel engine looks for
#: its Ray workers on its own address).
LOOPBACK_NODE = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "VLLM_HOST_IP": "127.0.0.1"}


def serve_environment(
    settings: Settings, base: dict[str, str], host: HostSettings | None = None
) -> dict[str, str]:
    """The environment of ``serve run`` (and so of the whole local Ray cluster).

    * ``RAY_worker_niceness=0``: Ray runs workers at nice 15 by default and vLLM's engine
      processes inherit it, which slows generation whenever the CPU is contended.
    * With ``METRICS_EXPORT_HOST=127.0.0.1`` (the default), :data:`LOOPBACK_NODE`.
    * With ``SERVE_LATENCY_TUNING``, :data:`LATENCY_TUNING`.
    * ``host``'s settings (the profile's ``devhost:`` section), which ``serve_run`` reads.
    * With ``SERVE_DIRECT_INGRESS``, Ray Serve's direct ingress: the ingress replica runs
      its own HTTP server, and its port range starts at ``LLM_PORT``, so clients reach it
      without the proxy hop (one replica per node gets ``LLM_PORT``; more get the next ports).

    A variable already set in ``base`` wins.
    """
    env = dict(base)
    env.setdefault("RAY_worker_niceness", "0")
    env["METRICS_EXPORT_PORT"] = str(settings.METRICS_EXPORT_PORT)
    if settings.METRICS_EXPORT_HOST == "127.0.0.1":
        for name, value in LOOPBACK_NODE.items():
            env.setdefault(name, value)
    env.update((host or HostSettings.from_environment()).environment())
    # Counters as Prometheus counters only (Ray also exports each as a gauge by default).
    env.setdefault("RAY_EXPORT_COUNTER_AS_GAUGE", "0")
    if settings.SERVE_LATENCY_TUNING:
        for name, value in LATENCY_TUNING.items():
            env.setdefault(name, value)
    if settings.SERVE_DIRECT_INGRESS:
        env.setdefault("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1")
        env.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", str(settings.LLM_PORT))
        env.setdefault("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", str(settings.LLM_PORT + 100))
        env.setdefault("RAY_SERVE_DEFAULT_HTTP_HOST", settings.LLM_HOST)
    return env


def redis_answers(host: str, port: int) -> bool:
    """Whether a Redis server answers PING at ``host:port``."""
    import redis

    try:
        return bool(
            redis.Redis(host=host, port=port, socket_timeout=1, socket_connect_timeout=1).ping()
        )
    except (redis.RedisError, OSError):
        return False


#: The AOF fsync policy of the Redis ``make serve`` starts (docs/deployment.md, "Redis").
#: ``always``: Redis fsyncs the append-only file before it answers, so no acknowledged turn
#: is lost, whether redis-server or the machine crashes (``everysec`` may lose the last
#: second, and a kill during its background fsync); it costs ~0.3 ms per turn write here.
REDIS_APPENDFSYNC = "always"


def redis_server_command(
    binary: str,
    host: str,
    port: int,
    data_dir: Path,
    *,
    appendfsync: str = REDIS_APPENDFSYNC,
    maxmemory: str = "0",
) -> list[str]:
    """The ``redis-server`` command line: foreground, append-only file in ``data_dir``.

    No RDB snapshots: the append-only file, synced per ``appendfsync`` (``always``,
    see :data:`REDIS_APPENDFSYNC`; ``everysec``; ``no``), is the only persistence.
    Memory is capped at ``maxmemory`` (``REDIS_MAXMEMORY``; ``0``: no cap) with the
    ``noeviction`` policy: a full Redis refuses writes (the ingress answers 503) rather
    than evicting keys, which would drop turns already acknowledged to clients.
    """
    command = [binary, "--port", str(port), "--bind", host, "--dir", str(data_dir)]
    command += ["--appendonly", "yes", "--appendfsync", appendfsync, "--save", ""]
    command += ["--maxmemory", maxmemory, "--maxmemory-policy", "noeviction"]
    command += ["--daemonize", "no", "--loglevel", "warning"]
    return command


def start_redis(url: str, *, maxmemory: str = "0") -> subprocess.Popen[bytes] | None:
    """Start ``redis-server`` for ``url`` unless one answers there; return the process.

    ``maxmemory``: see :func:`redis_server_command`.
    """
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
    if redis_answers(host, port):
        say(f"Redis already answers at {host}:{port}; using it")
        return None
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SettingsError(f"REDIS_URL={url!r}: no Redis answers there and it is not local")
    binary = shutil.which("redis-server")
    if binary is None:
        raise SettingsError("redis-server is not installed (make serve installs it with apt-get)")
    data_dir = cache_root() / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    say(
        f"starting Redis on {host}:{port} (data in {data_dir}, AOF fsync {REDIS_APPENDFSYNC}, "
        f"maxmemory {maxmemory}, noeviction)"
    )
    process = subprocess.Popen(
        redis_server_command(
            binary, host, port, data_dir, appendfsync=REDIS_APPENDFSYNC, maxmemory=maxmemory
        ),
        start_new_session=True,
    )
    for _ in range(100):
        if redis_answers(host, port):
            return process
        if process.poll() is not None:
            raise SettingsError(f"redis-server exited with status {process.returncode}")
        time.sleep(0.1)
    process.terminate()
    raise SettingsError(f"redis-server did not answer on port {port} within 10 s")


class PortLost(RuntimeError):
    """Serve's HTTP server could not bind its port after start-up (its log line)."""


def ray_session_logs(root: int) -> Path | None:
    """The log folder of the Ray cluster that process ``root`` (or one under it) started.

    Read from the command line of the cluster's GCS server (``--session-dir=``); None
    while it has not started. Not ``/tmp/ray/session_latest``, which is the newest cluster
    on the machine: another ``make serve`` or test stack may have started one since.
    """
    todo = [root]
    while todo:
        pid = todo.pop()
        for argument in command_line(pid).split():
            if argument.startswith(SESSION_DIR_FLAG):
                return Path(argument.removeprefix(SESSION_DIR_FLAG)) / "logs"
        todo += children(pid)
    return None


def bind_failure(since: float, port: int, logs: Path) -> str | None:
    """The line of Serve's logs (written after ``since``) saying it could not bind ``port``.

    With direct ingress Ray then moves the ingress to the next port and never comes back
    to ``port`` (the controller blocks it), so the app would stay unreachable.
    """
    files = []
    for folder in (logs, logs / "serve"):
        try:
            files += [f for f in folder.iterdir() if f.is_file() and f.stat().st_mtime >= since]
        except OSError:
            continue
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if any(marker in line for marker in BIND_FAILURES) and (
                f"port {port}" in line or "proxy" in line
            ):
                return line.strip()[-400:]
    return None


def check_port(host: str, port: int, what: str, wait_s: float = PORT_WAIT_S) -> None:
    """Wait (at most ``wait_s``) until ``port`` can be bound; else a SettingsError naming it."""
    holder: list[str] = []

    def waiting(description: str) -> None:
        holder.append(description)
        say(f"port {port} ({what}) is in use by {description}; waiting up to {wait_s:.0f} s")

    if not wait_until_listenable(host, port, wait_s, on_wait=waiting):
        raise SettingsError(
            f"port {port} ({what}) on {host} is still in use by {holder[0]} after {wait_s:.0f} s: "
            f"stop that process or choose another {what}"
        )
    if holder:
        say(f"port {port} is free now")


def wait_healthy(
    base_url: str, serve_process: subprocess.Popen[bytes], port: int, since: float
) -> None:
    """Poll ``/health`` until 200; print progress; fail if ``serve run`` exits.

    Raises :class:`PortLost` when Serve logs that its HTTP server could not bind ``port``.
    """
    started = time.monotonic()
    last_report = 0.0
    last_state = "starting"
    parsed = urlparse(base_url)
    # One keep-alive connection, closed by us: a "Connection: close" poll (urllib) would
    # leave the server's side of each connection in TIME_WAIT, and those keep the port
    # from being bound again for a minute after a stop.
    connection = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port, timeout=5)
    logs: Path | None = None  # the Ray cluster's log folder, once its GCS server runs
    try:
        while time.monotonic() - started < STARTUP_TIMEOUT_S:
            if serve_process.poll() is not None:
                raise RuntimeError(f"serve run exited with status {serve_process.returncode}")
            try:
                connection.request("GET", "/health")
                response = connection.getresponse()
                body = response.read()
                if response.status == 200:
                    return
                last_state = f"HTTP {response.status}{_health_problems(body)}"
            except (http.client.HTTPException, OSError):
                connection.close()
                last_state = "not listening yet"
                # The cluster's log folder does not change once found.
                logs = logs or ray_session_logs(serve_process.pid)
                failure = bind_failure(since, port, logs) if logs else None
                if failure is not None:
                    raise PortLost(failure) from None
            elapsed = time.monotonic() - started
            if elapsed - last_report >= 10:
                say(f"waiting for the app ({elapsed:.0f} s, /health: {last_state})")
                last_report = elapsed
            time.sleep(1)
    finally:
        connection.close()
    raise RuntimeError(f"the app was not healthy within {STARTUP_TIMEOUT_S:.0f} s")


def _health_problems(body: bytes) -> str:
    """The ``problems`` of a 503 from ``/health`` (why replicas are not up), if any."""
    try:
        problems = json.loads(body).get("problems") or []
    except (ValueError, AttributeError):
        return ""
    return f": {'; '.join(str(p) for p in problems)[:600]}" if problems else ""


def stop_process(
    process: subprocess.Popen[bytes] | None,
    name: str,
    timeout_s: float,
    shutdown: Shutdown | None = None,
) -> None:
    """SIGTERM, then SIGKILL to its process group after ``timeout_s``; quiet when gone.

    Sooner than ``timeout_s`` once ``shutdown`` is hurried.
    """
    if process is None or process.poll() is not None:
        return
    shutdown = shutdown or Shutdown()
    say(f"stopping {name} (pid {process.pid})")
    process.terminate()
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < shutdown.deadline(deadline):
        shutdown.announce_hurry()
        time.sleep(STOP_POLL_S)
    if process.poll() is None:
        say(f"{name} still runs: SIGKILL to its process group")
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def started_under(pid: int) -> dict[int, str]:
    """Every process under ``pid`` (not ``pid``), with its start time (against pid reuse)."""
    return {child: start_time(child) for child in descendants(pid)[1:]}


def stop_leftovers(started: dict[int, str], shutdown: Shutdown) -> None:
    """Wait for the processes of ``started`` (:func:`started_under`) to exit.

    Those left after :data:`LEFTOVER_WAIT_S` (sooner once hurried) get SIGKILL.
    """

    def alive() -> list[int]:
        return [pid for pid, began in started.items() if began and start_time(pid) == began]

    deadline = time.monotonic() + LEFTOVER_WAIT_S
    while alive() and time.monotonic() < shutdown.deadline(deadline):
        shutdown.announce_hurry()
        time.sleep(STOP_POLL_S)
    left = alive()
    if left:
        say(f"SIGKILL to {len(left)} process(es) still left: {', '.join(map(str, left))}")
    for pid in left:
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    for pid in left:  # reap our own children among them (the others' parents do)
        with suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def start_serve(
    profile: dict[str, Any], settings: Settings
) -> tuple[subprocess.Popen[bytes], float]:
    """Write the rendered profile and start ``serve run`` on it; return it and its start time."""
    run_dir = cache_root() / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / f"serve-config-{settings.LLM_PORT}.yaml"
    proxy_port = reserved_free_port(settings.LLM_HOST) if settings.SERVE_DIRECT_INGRESS else None
    rendered = render_profile(profile, settings, proxy_port)
    config_path.write_text(yaml.safe_dump(rendered, sort_keys=False))
    env = serve_environment(settings, dict(os.environ), HostSettings.from_profile(profile))
    say(f"starting Ray Serve: serve run {config_path} (metrics on :{settings.METRICS_EXPORT_PORT})")
    started = time.time()
    process = subprocess.Popen(
        [sys.executable, "-m", "cloudllm_serve.devhost.serve_run", str(config_path)],
        env=env,
        start_new_session=True,
    )
    return process, started


def run(profile_path: Path, start_redis_server: bool, port_wait_s: float = PORT_WAIT_S) -> int:
    """Launch everything; return the exit status."""
    try:
        profile = load_profile(profile_path)
        settings = profile_settings(profile)
        HostSettings.from_profile(profile)
    except SettingsError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2

    if Path(settings.engine_model) == default_model_dir() and not is_prepared(default_model_dir()):
        prepare()

    shutdown = Shutdown()
    shutdown.install()
    processes: list[subprocess.Popen[bytes] | None] = [None, None]  # Serve, Redis
    try:
        return _launch(profile, settings, start_redis_server, port_wait_s, shutdown, processes)
    except Stopped as stop:
        say(f"{stop} received, shutting down")
        return 0
    except (RuntimeError, SettingsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        # No signal raises from here on (see Shutdown): a later one only hurries the stop.
        started = started_under(os.getpid())
        stop_serve(processes[0], settings, port_wait_s, shutdown)
        stop_process(processes[1], "Redis", 10, shutdown)
        stop_leftovers(started, shutdown)
        say("stopped")


def _launch(
    profile: dict[str, Any],
    settings: Settings,
    start_redis_server: bool,
    port_wait_s: float,
    shutdown: Shutdown,
    processes: list[subprocess.Popen[bytes] | None],
) -> int:
    """Start Redis and Serve (into ``processes``), then wait until Serve exits.

    Only the waits are :meth:`Shutdown.interruptible`: a process, once started, is
    always in ``processes`` for :func:`run` to stop.
    """
    host = "127.0.0.1" if settings.LLM_HOST in ("0.0.0.0", "::") else settings.LLM_HOST
    base_url = f"http://{host}:{settings.LLM_PORT}"
    with shutdown.interruptible():
        check_port(settings.LLM_HOST, settings.LLM_PORT, "LLM_PORT", port_wait_s)
        check_port(
            settings.METRICS_EXPORT_HOST,
            settings.METRICS_EXPORT_PORT,
            "METRICS_EXPORT_PORT",
            port_wait_s,
        )
    if start_redis_server and (settings.REDIS_SENTINELS or settings.REDIS_CLUSTER):
        say("--start-redis: not starting Redis (REDIS_SENTINELS or REDIS_CLUSTER name yours)")
    elif start_redis_server:
        processes[1] = start_redis(settings.REDIS_URL, maxmemory=settings.REDIS_MAXMEMORY)
    for attempt in range(1, BIND_RESTARTS + 1):
        serve_process, started = start_serve(profile, settings)
        processes[0] = serve_process
        try:
            with shutdown.interruptible():
                wait_healthy(base_url, serve_process, settings.LLM_PORT, started)
            break
        except PortLost as lost:
            say(f"Serve could not listen on port {settings.LLM_PORT}: {lost}")
            if attempt == BIND_RESTARTS:
                raise RuntimeError(
                    f"Serve could not listen on port {settings.LLM_PORT} (LLM_PORT) in "
                    f"{BIND_RESTARTS} starts"
                ) from None
            say(f"restarting Ray Serve once the port is free (attempt {attempt + 1})")
            stop_serve(serve_process, settings, port_wait_s, shutdown)
            with shutdown.interruptible():
                check_port(settings.LLM_HOST, settings.LLM_PORT, "LLM_PORT", port_wait_s)
    say(f"ready: {base_url}  (API docs: {base_url}/docs; Ctrl-C stops)")
    say(
        f"metrics: http://127.0.0.1:{settings.METRICS_EXPORT_PORT}/metrics  (Prometheus text, "
        f"listening on {settings.METRICS_EXPORT_HOST})"
    )
    running = processes[0]
    assert running is not None
    with shutdown.interruptible():
        status = running.wait()
    say(f"serve run exited with status {status}")
    return status or 1


def stop_serve(
    process: subprocess.Popen[bytes] | None,
    settings: Settings,
    wait_s: float = PORT_WAIT_S,
    shutdown: Shutdown | None = None,
) -> None:
    """Stop ``serve run``, then wait until its HTTP server has let go of ``LLM_PORT``.

    Ray's workers may outlive ``serve run`` by a moment; a start right after this
    returns then finds the port free. A hurried ``shutdown`` shortens both waits.
    """
    if process is None:
        return
    shutdown = shutdown or Shutdown()
    stop_process(process, "Ray Serve", 60, shutdown)
    if wait_until_listenable(settings.LLM_HOST, settings.LLM_PORT, 0):
        return
    say(f"waiting (at most {wait_s:.0f} s) until port {settings.LLM_PORT} is free again")
    deadline = time.monotonic() + wait_s
    while not wait_until_listenable(settings.LLM_HOST, settings.LLM_PORT, 0.5):
        shutdown.announce_hurry()
        if time.monotonic() >= shutdown.deadline(deadline):
            say(f"port {settings.LLM_PORT} is still in use after the stop")
            return


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description="Run CloudLLM Serve from a deployment profile.")
    parser.add_argument("--profile", type=Path, default=Path("deployments/cpu.yaml"))
    parser.add_argument(
        "--start-redis",
        action="store_true",
        help="start redis-server for REDIS_URL unless one answers there",
    )
    parser.add_argument(
        "--port-wait-s",
        type=float,
        default=PORT_WAIT_S,
        help=f"how long a busy LLM_PORT is waited for, at start and after a stop "
        f"(default {PORT_WAIT_S:.0f} s: a stopped server's port stays busy up to 60 s)",
    )
    args = parser.parse_args(argv)
    return run(args.profile, args.start_redis, args.port_wait_s)


if __name__ == "__main__":
    raise SystemExit(main())
