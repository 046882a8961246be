"""``make serve`` with an engine replica that fails in its constructor: its error, then exit 1.

Serve retries a replica that fails to start (3 times for one replica) and then marks the
application DEPLOY_FAILED; the launcher used to wait 900 s showing only "/health: HTTP
503". Here vLLM is given a tokenizer path that does not exist (a setting our checks let
through: only vLLM knows it is wrong), so the replica fails after vLLM has started.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.startup.test_port_at_start import Launcher
from tests.support import RedisServer, server_port

#: Serve's tries of a replica that fails to start (3 by default, ~20 s each here: each
#: imports vLLM); one is enough to show the error and the exit, and saves 40 s of suite.
SERVE_RETRIES = {"RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT": "1"}
EXIT_WITHIN_S = 240


def test_a_replica_failing_at_start_is_shown_and_ends_the_launcher(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    launcher = Launcher(
        redis_server,
        server_port(),
        tmp_path / "launcher.log",
        port_wait_s=5,
        env_overrides={
            "VLLM_ENGINE_KWARGS": '{"tokenizer": "/no-such-tokenizer"}',
            **SERVE_RETRIES,
        },
    )
    try:
        status = launcher.process.wait(EXIT_WITHIN_S)
    finally:
        if launcher.process.poll() is None:
            launcher.stop()
    output = launcher.output()
    elapsed = time.monotonic() - launcher.started_at
    print(f"launcher exited with {status} after {elapsed:.0f} s")
    assert status == 1, output[-3000:]
    ours = [line for line in output.splitlines() if line.startswith("[serve] ")]
    shown = "\n".join(line for line in output.splitlines() if not line.startswith("("))
    # The replica's own exception, printed by us (not only in Ray's log lines).
    assert any("deployment EngineServer" in line for line in ours), output[-3000:]
    # Serve's words: "A replica failed to start ..." while it retries, "The deployment
    # failed to start N times in a row ..." once it gives up.
    assert "failed to start" in "\n".join(ours)
    assert any(
        line.startswith("OSError") and "/no-such-tokenizer" in line for line in shown.splitlines()
    ), shown[-3000:]
    assert "[serve] application cloudllm failed to deploy" in output
    assert "error: serve run exited with status 1" in output
