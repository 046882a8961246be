"""``serve run`` with Ray's metrics agent on a fixed port, and start-up failures surfaced.

``serve run CONFIG`` starts a local Ray cluster with ``ray.init()`` unless the process
is already connected, and ``ray.init`` chooses the metrics agent's port at random.
This module starts that local cluster itself, with ``_metrics_export_port`` set to
``METRICS_EXPORT_PORT``, then hands the config to Ray Serve's own ``serve run`` command
(non-blocking: it deploys and returns) and watches the applications itself instead of
``serve run``'s silent loop:

- every new status message of a deployment that is not healthy is printed (a replica
  that fails in its constructor: Serve's message carries the replica's own exception);
- an application that fails to deploy before it first ran (Serve gave up after its
  retries: 3 per replica) ends this process with status 1, which stops the cluster.

SIGTERM stops it and the cluster it started (Ray's handler for the driver that started
the cluster), as with ``serve run``.

Every look also applies the host's settings (:class:`~.settings.HostSettings`, from the
environment the launcher gives it): the nice values of the cluster's serving layer and
vLLM's processes (``SERVING_NICENESS``, ``ENGINE_NICENESS``;
:mod:`cloudllm_serve.devhost.cpu_priority`), and with ``SERVING_OFF_ENGINE_CPUS`` the
serving layer kept off the cores vLLM's workers are bound to
(:mod:`cloudllm_serve.devhost.cpu_affinity`).

Usage (the launcher runs it): ``python -m cloudllm_serve.devhost.serve_run CONFIG``, with the
port in ``METRICS_EXPORT_PORT`` (8080 if unset).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from cloudllm_serve.devhost.cpu_affinity import keep_off_engine_cpus
from cloudllm_serve.devhost.cpu_priority import settle_priorities
from cloudllm_serve.devhost.settings import HostSettings

DEFAULT_METRICS_EXPORT_PORT = 8080
#: How often the applications' status is read.
WATCH_INTERVAL_S = 2.0
#: The last lines of a status message that are printed (a replica's traceback).
MESSAGE_LINES = 25


def say(message: str) -> None:
    """One line (or block) of this process's output, flushed."""
    print(f"[serve] {message}", file=sys.stderr, flush=True)


def failures(status: Any, seen: dict[str, tuple[str, str]]) -> list[str]:
    """New messages of deployments that are not healthy, as lines to print.

    ``status`` is :func:`ray.serve.status`'s answer; ``seen`` (updated) holds, per
    deployment, the first line (Serve's words) and last line (the exception) last shown. A
    new exception is shown with the end of its traceback; one already shown (Serve's next
    retry) with only its last line.
    """
    lines = []
    for app_name, app in status.applications.items():
        for name, deployment in app.deployments.items():
            key = f"{app_name}/{name}"
            state = str(getattr(deployment.status, "value", deployment.status))
            message = (deployment.message or "").strip().splitlines()
            if state == "HEALTHY" or not message:
                continue
            header, error = message[0], message[-1]
            if seen.get(key) == (header, error):
                continue
            shown_before = any(error == last for _, last in seen.values())
            body = message[1:][-MESSAGE_LINES:] if not shown_before else message[1:][-1:]
            seen[key] = (header, error)
            lines.append("\n".join([f"deployment {name} ({state}): {header}", *body]))
    return lines


def failed_apps(status: Any, ran: set[str]) -> list[str]:
    """Applications that failed to deploy and never ran; ``ran`` (updated) holds those that did."""
    failed = []
    for app_name, app in status.applications.items():
        state = str(getattr(app.status, "value", app.status))
        if state == "RUNNING":
            ran.add(app_name)
        elif state == "DEPLOY_FAILED" and app_name not in ran:
            failed.append(app_name)
    return failed


def watch(interval_s: float = WATCH_INTERVAL_S, host: HostSettings | None = None) -> int:
    """Print deployment failures until an application fails before it ever ran; return 1.

    With ``host``, each look also settles the nice values of this cluster's processes
    (:func:`~cloudllm_serve.devhost.cpu_priority.settle_priorities`: Serve starts its
    proxy after the controller, replicas come and go) and, with
    ``SERVING_OFF_ENGINE_CPUS``, keeps the serving layer and Serve's replicas off the
    cores vLLM's workers are bound to
    (:func:`~cloudllm_serve.devhost.cpu_affinity.keep_off_engine_cpus`).
    """
    from ray import serve

    seen: dict[str, tuple[str, str]] = {}
    ran: set[str] = set()
    allowed = os.sched_getaffinity(0)  # before this process binds itself too
    while True:
        if host is not None:
            settle_priorities(os.getpid(), host.SERVING_NICENESS, host.ENGINE_NICENESS)
            if host.SERVING_OFF_ENGINE_CPUS:
                keep_off_engine_cpus(os.getpid(), allowed)
        time.sleep(interval_s)
        try:
            status = serve.status()
        except Exception as error:  # the controller restarting: try again
            say(f"could not read Serve's status: {error!r}")
            continue
        for line in failures(status, seen):
            say(line)
        failed = failed_apps(status, ran)
        if failed:
            say(f"application {', '.join(failed)} failed to deploy (its error is above); stopping")
            return 1


def main(argv: list[str] | None = None) -> int:
    """Start Ray with the fixed metrics port, deploy ``argv``'s config, then watch it."""
    import ray
    from ray.serve.scripts import cli

    from cloudllm_serve.ray_serve_internals import SERVE_NAMESPACE

    port = int(os.environ.get("METRICS_EXPORT_PORT") or DEFAULT_METRICS_EXPORT_PORT)
    ray.init(namespace=SERVE_NAMESPACE, _metrics_export_port=port)
    args = ["run", "--non-blocking", *(sys.argv[1:] if argv is None else argv)]
    cli.main(args=args, prog_name="serve", standalone_mode=False)
    try:
        return watch(host=HostSettings.from_environment())
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
