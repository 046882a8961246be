"""``serve run`` with Ray's metrics agent on a fixed port.

``serve run CONFIG`` starts a local Ray cluster with ``ray.init()`` unless the process
is already connected, and ``ray.init`` chooses the metrics agent's port at random.
This module starts that local cluster itself, with ``_metrics_export_port`` set to
``METRICS_EXPORT_PORT``, then hands over to Ray Serve's own ``serve run`` command, which
finds Ray initialised and goes on exactly as it does from the shell (SIGTERM stops it
and the cluster it started).

Usage (the launcher runs it): ``python -m cloudllm_serve.serve_run CONFIG``, with the
port in ``METRICS_EXPORT_PORT`` (8080 if unset).
"""

from __future__ import annotations

import os
import sys

DEFAULT_METRICS_EXPORT_PORT = 8080


def main(argv: list[str] | None = None) -> int:
    """Start Ray with the fixed metrics port, then run ``serve run`` on ``argv``."""
    import ray
    from ray.serve._private.constants import SERVE_NAMESPACE
    from ray.serve.scripts import cli

    port = int(os.environ.get("METRICS_EXPORT_PORT") or DEFAULT_METRICS_EXPORT_PORT)
    ray.init(namespace=SERVE_NAMESPACE, _metrics_export_port=port)
    cli.main(args=["run", *(sys.argv[1:] if argv is None else argv)], prog_name="serve")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
