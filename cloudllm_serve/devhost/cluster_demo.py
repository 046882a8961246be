"""A two-node Ray cluster on one machine, the app deployed on it with ``serve deploy``.

``python -m cloudllm_serve.devhost.cluster_demo up`` (``make cluster-demo``) starts:

* Redis, on loopback (both nodes reach it there; on real machines, a Redis both reach);
* a head node (``ray start --head``, node name :data:`HEAD_NODE`) with the custom resource
  :data:`INGRESS_RESOURCE`: Serve's controller, its proxy and the ingress replica;
* a worker node (``ray start --address``, node name :data:`WORKER_NODE`) with the custom
  resource :data:`ENGINE_RESOURCE`: the engine replicas (``ENGINE_NODE_RESOURCE``);
* the application (``deployments/cluster-demo.yaml``, the simulated engine) through
  ``serve deploy`` to the head's dashboard, as on a real cluster.

Every port is chosen free at ``up`` and kept in ``<dir>/cluster.json``, and Ray's files
go under ``/tmp/cloudllm-ray-<GCS port>`` (Ray's socket paths must stay short), so the
cluster shares nothing with other Ray clusters on the machine. ``down`` stops it;
``stop-node``/``start-node`` stop and start one node; never ``ray stop``, which ends every
Ray of the machine: a node is stopped by its raylet's PID (and the processes under it), the
cluster by the processes that name its Ray folder. A workbench tool: nothing a replica
runs imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cloudllm_serve.devhost.launcher import redis_answers, redis_server_command
from cloudllm_serve.devhost.ports import reserved_free_port
from cloudllm_serve.devhost.procfs import command_line, descendants

#: Node names (``ray start --node-name``), as ``/status/detailed`` shows them.
HEAD_NODE = "cloudllm-head"
WORKER_NODE = "cloudllm-worker"
#: Custom resources: the worker's runs engine replicas, the head's the ingress.
ENGINE_RESOURCE = "cloudllm_engine"
INGRESS_RESOURCE = "cloudllm_ingress"
#: The Serve config ``up`` deploys (ports and Redis filled in).
PROFILE = Path(__file__).resolve().parents[2] / "deployments" / "cluster-demo.yaml"
DEFAULT_DIR = Path("/tmp/cloudllm-cluster")
STATE_FILE = "cluster.json"
LOOPBACK = "127.0.0.1"
#: Worker ports per node (Ray's own range, 10002-19999, is left to other clusters).
WORKER_PORTS = 200


@dataclass
class NodePorts:
    """The ports one Ray node listens on."""

    node_manager: int
    object_manager: int
    metrics_export: int
    agent_listen: int
    agent_grpc: int
    runtime_env_agent: int
    min_worker: int


@dataclass
class ClusterState:
    """Where the demo cluster lives: its folder, ports and node resources."""

    folder: str
    gcs_port: int
    dashboard_port: int
    client_port: int
    http_port: int
    redis_port: int
    head: NodePorts
    worker: NodePorts
    head_cpus: int = 1
    worker_cpus: int = 2
    engine_slots: int = 16
    redis_pid: int = 0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def ray_dir(self) -> Path:
        """Ray's files (``--temp-dir``): a short path, as Ray's sockets need (107 bytes)."""
        return Path(f"/tmp/cloudllm-ray-{self.gcs_port}")

    @property
    def address(self) -> str:
        """The head's GCS address (``ray start --address``, ``ray.init``)."""
        return f"{LOOPBACK}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """Where ``serve deploy`` and ``serve status`` talk to the cluster."""
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    @property
    def http_url(self) -> str:
        """The app's HTTP address (Serve's proxy on the head)."""
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def redis_url(self) -> str:
        """The Redis both nodes use."""
        return f"redis://{LOOPBACK}:{self.redis_port}/0"

    def save(self) -> None:
        """Write the state to ``<folder>/cluster.json``."""
        Path(self.folder, STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: Path) -> ClusterState:
        """The state ``up`` wrote into ``folder``."""
        raw = json.loads((folder / STATE_FILE).read_text())
        raw["head"] = NodePorts(**raw["head"])
        raw["worker"] = NodePorts(**raw["worker"])
        return cls(**raw)


class _Ports:
    """Free ports, none twice and none inside a worker-port range handed out."""

    def __init__(self) -> None:
        self._taken: set[int] = set()

    def one(self) -> int:
        while (port := reserved_free_port(LOOPBACK)) in self._taken:
            pass
        self._taken.add(port)
        return port

    def worker_range(self) -> int:
        """The first of :data:`WORKER_PORTS` ports in a row that hold no port handed out."""
        while True:
            start = reserved_free_port(LOOPBACK)
            span = set(range(start, start + WORKER_PORTS))
            if start + WORKER_PORTS < 32768 and not span & self._taken:
                self._taken |= span
                return start

    def node(self) -> NodePorts:
        start = self.worker_range()
        return NodePorts(
            self.one(), self.one(), self.one(), self.one(), self.one(), self.one(), start
        )


def new_state(folder: Path, *, engine_slots: int = 16, worker_cpus: int = 2) -> ClusterState:
    """Fresh ports for a cluster in ``folder``."""
    ports = _Ports()
    head, worker = ports.node(), ports.node()
    return ClusterState(
        folder=str(folder),
        gcs_port=ports.one(),
        dashboard_port=ports.one(),
        client_port=ports.one(),
        http_port=ports.one(),
        redis_port=ports.one(),
        head=head,
        worker=worker,
        engine_slots=engine_slots,
        worker_cpus=worker_cpus,
    )


#: Ray's node health checks in the demo cluster (read by the GCS of ``ray start --head``).
NODE_HEALTH_CHECKS = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def ray_environment(state: ClusterState) -> dict[str, str]:
    """The environment of ``ray start`` and ``serve deploy`` (inherited by every worker)."""
    env = dict(os.environ)
    env.update(
        {
            # Ray 2.60 turns token authentication on; its CLI then needs to be told.
            "RAY_AUTH_MODE": "token",
            "RAY_worker_niceness": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            # The GCS declares a node dead after this many missed health checks, one a
            # second, instead of Ray's 5 every 3 s: requests in flight on a lost node's
            # replicas wait for that verdict (docs/deployment.md, "A node lost").
            **NODE_HEALTH_CHECKS,
        }
    )
    env.update(state.env)
    # Set to 0 (the launcher's one-node clusters), it refuses a second node.
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    return env


def _ray_binary(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _node_arguments(ports: NodePorts) -> list[str]:
    return [
        f"--node-manager-port={ports.node_manager}",
        f"--object-manager-port={ports.object_manager}",
        f"--metrics-export-port={ports.metrics_export}",
        f"--dashboard-agent-listen-port={ports.agent_listen}",
        f"--dashboard-agent-grpc-port={ports.agent_grpc}",
        f"--runtime-env-agent-port={ports.runtime_env_agent}",
        f"--min-worker-port={ports.min_worker}",
        f"--max-worker-port={ports.min_worker + WORKER_PORTS - 1}",
        f"--node-ip-address={LOOPBACK}",
        "--object-store-memory=200000000",
        "--disable-usage-stats",
    ]


def head_command(state: ClusterState) -> list[str]:
    """``ray start --head``: the head node, named, with the ingress resource."""
    return [
        _ray_binary("ray"),
        "start",
        "--head",
        f"--node-name={HEAD_NODE}",
        f"--port={state.gcs_port}",
        f"--dashboard-port={state.dashboard_port}",
        f"--ray-client-server-port={state.client_port}",
        "--include-dashboard=true",
        f"--dashboard-host={LOOPBACK}",
        f"--num-cpus={state.head_cpus}",
        f"--resources={json.dumps({INGRESS_RESOURCE: 8})}",
        f"--temp-dir={state.ray_dir}",
        *_node_arguments(state.head),
    ]


def worker_command(state: ClusterState) -> list[str]:
    """``ray start --address``: the worker node, named, with the engine resource."""
    return [
        _ray_binary("ray"),
        "start",
        f"--address={state.address}",
        f"--node-name={WORKER_NODE}",
        f"--num-cpus={state.worker_cpus}",
        f"--resources={json.dumps({ENGINE_RESOURCE: state.engine_slots})}",
        *_node_arguments(state.worker),
    ]


def serve_config(state: ClusterState, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``deployments/cluster-demo.yaml`` with this cluster's port, Redis and ``overrides``."""
    config: dict[str, Any] = yaml.safe_load(PROFILE.read_text())
    config["http_options"]["port"] = state.http_port
    config["http_options"]["host"] = LOOPBACK
    app = config["applications"][0]
    app["args"]["REDIS_URL"] = state.redis_url
    app["args"].update(overrides or {})
    return config


def _run(command: list[str], state: ClusterState, timeout_s: float = 120) -> str:
    done = subprocess.run(
        command,
        env=ray_environment(state),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command[:3])} failed ({done.returncode}): "
            f"{(done.stderr or done.stdout)[-3000:]}"
        )
    return done.stdout


def start_redis(state: ClusterState) -> None:
    """A ``redis-server`` on the state's port (data in ``<folder>/redis``)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (make serve installs it)")
    data = Path(state.folder) / "redis"
    data.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        redis_server_command(binary, LOOPBACK, state.redis_port, data, appendfsync="everysec"),
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    state.redis_pid = process.pid
    for _ in range(100):
        if redis_answers(LOOPBACK, state.redis_port):
            return
        time.sleep(0.1)
    raise RuntimeError(f"redis-server did not answer on port {state.redis_port}")


def start_node(state: ClusterState, node: str) -> None:
    """``ray start`` the head (:data:`HEAD_NODE`) or the worker (:data:`WORKER_NODE`)."""
    _run(head_command(state) if node == HEAD_NODE else worker_command(state), state)


def deploy(state: ClusterState, overrides: dict[str, Any] | None = None) -> None:
    """``serve deploy`` the app to the cluster's dashboard (returns before it runs)."""
    path = Path(state.folder) / "serve-config.yaml"
    path.write_text(yaml.safe_dump(serve_config(state, overrides), sort_keys=False))
    _run([_ray_binary("serve"), "deploy", "--address", state.dashboard_url, str(path)], state)


def up(
    folder: Path,
    overrides: dict[str, Any] | None = None,
    *,
    engine_slots: int = 16,
    worker_cpus: int = 2,
    env: dict[str, str] | None = None,
) -> ClusterState:
    """Redis, the head, the worker, then ``serve deploy``; the state is saved in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    state = new_state(folder, engine_slots=engine_slots, worker_cpus=worker_cpus)
    state.env = dict(env or {})
    state.save()
    try:
        start_redis(state)
        state.save()
        start_node(state, HEAD_NODE)
        start_node(state, WORKER_NODE)
        deploy(state, overrides)
    except BaseException:
        down(state)
        raise
    return state


def cluster_processes(state: ClusterState) -> list[int]:
    """Every Ray process of the cluster: its command line names Ray's folder or the GCS.

    Never this process or one of its parents (a shell whose command names the folder).
    """
    ray_folder = f"{state.ray_dir}/"
    marks = (ray_folder, f"--gcs_server_port={state.gcs_port}")
    ours = set(_ancestors(os.getpid()))
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in ours:
            continue
        line = command_line(int(entry.name))
        if any(mark in line for mark in marks):
            found.append(int(entry.name))
    return found


def _ancestors(pid: int) -> list[int]:
    """``pid`` and its parents up to init."""
    chain = [pid]
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat[stat.rindex(")") + 2 :].split()[1])
        chain.append(pid)
    return chain


def raylet_pid(state: ClusterState, node: str) -> int | None:
    """The PID of ``node``'s raylet in this cluster, if it runs."""
    for pid in cluster_processes(state):
        line = command_line(pid)
        if line.split(" ")[0].endswith("/raylet") and f"--node-name={node} " in line + " ":
            return pid
    return None


def _kill(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def stop_node(state: ClusterState, node: str) -> int | None:
    """SIGKILL ``node``'s raylet and every process under it (a machine lost); its PID."""
    pid = raylet_pid(state, node)
    if pid is None:
        return None
    _kill(list(reversed(descendants(pid))))
    return pid


def down(state: ClusterState) -> None:
    """Stop the whole cluster: its Ray processes (never ``ray stop``), its Redis, Ray's files."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        _kill(cluster_processes(state), sig)
        deadline = time.monotonic() + 10
        while cluster_processes(state) and time.monotonic() < deadline:
            time.sleep(0.2)
    if state.redis_pid:
        _kill([state.redis_pid])
    if not cluster_processes(state):
        shutil.rmtree(state.ray_dir, ignore_errors=True)


def status(state: ClusterState) -> dict[str, Any]:
    """The nodes' raylet PIDs and the app's ``/health`` answer."""
    import urllib.error
    import urllib.request

    health: Any
    try:
        with urllib.request.urlopen(f"{state.http_url}/health", timeout=5) as answer:
            health = json.loads(answer.read())
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            health = json.loads(body)
        except ValueError:
            health = f"HTTP {error.code}: {body[:200]!r}"
    except OSError as error:
        health = f"unreachable: {error}"
    return {
        "address": state.address,
        "dashboard": state.dashboard_url,
        "http": state.http_url,
        "redis": state.redis_url,
        "raylets": {node: raylet_pid(state, node) for node in (HEAD_NODE, WORKER_NODE)},
        "health": health,
    }


def main(argv: list[str] | None = None) -> int:
    """``up`` | ``status`` | ``stop-node NODE`` | ``start-node NODE`` | ``down``."""
    parser = argparse.ArgumentParser(prog="python -m cloudllm_serve.devhost.cluster_demo")
    parser.add_argument("action", choices=["up", "status", "stop-node", "start-node", "down"])
    parser.add_argument("node", nargs="?", choices=[HEAD_NODE, WORKER_NODE], default=WORKER_NODE)
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="the cluster's folder")
    args = parser.parse_args(argv)
    if args.action == "up":
        if (args.dir / STATE_FILE).exists() and cluster_processes(ClusterState.load(args.dir)):
            print(f"a cluster runs in {args.dir} already: down it first", file=sys.stderr)
            return 1
        state = up(args.dir)
        print(f"deployed; the app answers at {state.http_url} once its replicas run")
        print(json.dumps(status(state), indent=2))
        return 0
    state = ClusterState.load(args.dir)
    if args.action == "status":
        print(json.dumps(status(state), indent=2))
    elif args.action == "stop-node":
        print(f"{args.node}: raylet {stop_node(state, args.node)} and its processes killed")
    elif args.action == "start-node":
        start_node(state, args.node)
        print(f"{args.node} started")
    else:
        down(state)
        print(f"cluster in {args.dir} stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
