"""``make serve`` stopped every way a user or a supervisor stops it leaves nothing behind.

The launcher starts as ``make serve`` runs it (the CPU profile, ``--start-redis``, its own
Redis on a port of its own) in a process group of its own, as make's is, with its cache
folder in the test's (the models linked from the real one), so its Redis data, run folder
and audit log are the test's. Before each stop the test notes every process under the
launcher; within :data:`STOPPED_WITHIN_S` of the signal none may be left and both its
ports must be free. Stops:

- SIGTERM to the group (``kill -- -PGID``, systemd, container runtimes), followed 0.1 s
  later by the SIGTERM make forwards to its child, under a running stream; on vLLM;
- SIGINT twice, 1.5 s apart (Ctrl-C, and Ctrl-C again while it stops: a hurried stop);
- SIGHUP (the terminal closed).

"Ports free" means no socket but the kernel's TIME_WAIT ones (see :func:`held`).

The last two run on the simulated engine (``LLM_MODEL=sim``): it starts in about half
the time, and the stop path (signals, Serve's and Redis's stop, the sweep of what is
left) is the same code whatever the engine; the vLLM run covers vLLM's processes.
The vLLM run also checks the console (no audit or access line per request; the audit log
in the run folder) and that the metrics agent listens on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path

import openai
import psutil
import pytest
import requests
from openai import OpenAI

from cloudllm_serve.local_models import cache_root
from tests.conftest import REPO
from tests.support import server_port, wait_for

#: The acceptance bound: from the stop signal until nothing the launcher started is left.
STOPPED_WITHIN_S = 30
#: How long a start may take until the app is healthy (~45 s alone on 2 cores).
HEALTHY_WITHIN_S = 300
#: The model ``make serve`` serves by default.
MODEL = "SmolLM2-135M-Instruct"
#: A Serve access line (``GET /health 200 1.2ms``).
ACCESS_LINE = re.compile(r"\b(GET|POST) /(health|generate)\S* \d{3}\b")


class Served:
    """The launcher in a process group of its own, on free ports, its output in ``log``."""

    def __init__(self, folder: Path, model: str | None = None, cache: Path | None = None) -> None:
        self.port, self.metrics_port, self.redis_port = server_port(), server_port(), server_port()
        if cache is None:  # a first start; a restart passes the first one's cache (its Redis)
            cache = folder / "cache"
            cache.mkdir()
            (cache / "models").symlink_to(cache_root() / "models")
        self.cache = cache
        self.log = folder / "launcher.log"
        env = {
            **os.environ,
            "CLOUDLLM_CACHE_DIR": str(self.cache),
            "LLM_HOST": "127.0.0.1",
            "LLM_PORT": str(self.port),
            "METRICS_EXPORT_PORT": str(self.metrics_port),
            "REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("AUDIT_LOG", None)  # the default, as make serve runs
        if model:
            env["LLM_MODEL"] = model
        command = [sys.executable, "-m", "cloudllm_serve.devhost.launcher", "--start-redis"]
        command += ["--profile", str(REPO / "deployments" / "cpu.yaml"), "--port-wait-s", "5"]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"launcher exited:\n{self.output()[-3000:]}")
        try:
            return requests.get(f"{self.url}/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def started(self) -> list[psutil.Process]:
        """Every process under the launcher now."""
        return psutil.Process(self.process.pid).children(recursive=True)

    def stop(self, *signals: tuple[float, signal.Signals], group: bool = False) -> float:
        """Send ``signals`` (each after its delay); seconds until nothing started is left."""
        started = self.started()
        assert len(started) > 5, [p.name() for p in started]  # Redis, Ray, the replicas
        stopping = time.monotonic()
        for delay, number in signals:
            time.sleep(delay)
            if group and delay == 0.0:
                os.killpg(self.process.pid, number)
            else:
                self.process.send_signal(number)

        def nothing_left() -> bool:
            return self.process.poll() is not None and not alive(started)

        wait_for(nothing_left, STOPPED_WITHIN_S, interval_s=0.2)
        gone = time.monotonic() - stopping
        assert self.process.returncode == 0, self.output()[-3000:]
        ports = (self.port, self.metrics_port, self.redis_port)
        try:
            wait_for(lambda: not held(ports), STOPPED_WITHIN_S - gone, interval_s=0.2)
        except TimeoutError:
            raise AssertionError(held(ports)) from None
        took = time.monotonic() - stopping
        print(f"\n[stop] processes gone {gone:.1f} s, ports free {took:.1f} s after the signal")
        return took

    def kill(self) -> None:
        """After a failed check: nothing of this launcher may outlive the test."""
        if self.process.poll() is None:
            started = self.started()
            os.killpg(self.process.pid, signal.SIGKILL)
            for process in started:
                with suppress(psutil.Error):
                    process.kill()
            self.process.wait()


def read_out(response: requests.Response) -> None:
    """Read ``response`` until it ends or breaks."""
    with suppress(requests.RequestException):
        for _ in response.iter_lines():
            pass
    response.close()


def held(ports: tuple[int, ...]) -> list[str]:
    """The sockets on ``ports`` other than TIME_WAIT ones, as text.

    TIME_WAIT is the kernel's (60 s) for connections the stopped server closed (a stream
    cut by the stop), not a process's; since Serve's direct ingress binds without
    SO_REUSEADDR, it keeps a new bind of ``LLM_PORT`` waiting until then, which the
    launcher's next start waits out (``--port-wait-s``, 75 s by default).
    """
    return [
        f"{c.laddr} {c.status} pid {c.pid}"
        for c in psutil.net_connections("tcp")
        if c.laddr and c.laddr.port in ports and c.status != psutil.CONN_TIME_WAIT
    ]


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a zombie has exited; ``is_running`` guards against pid reuse)."""
    left = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                left.append(process)
        except psutil.NoSuchProcess:
            continue
    return left


def started(folder: Path, model: str | None = None, cache: Path | None = None) -> Served:
    served = Served(folder, model, cache)
    try:
        wait_for(served.healthy, HEALTHY_WITHIN_S, interval_s=0.5)
    except BaseException:
        served.kill()
        raise
    return served


def sdk(served: Served) -> OpenAI:
    return OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)


def test_a_group_sigterm_under_a_stream_on_vllm(tmp_path: Path) -> None:
    """make forwards the group's SIGTERM to the launcher: a second one 0.1 s later.

    Around the stop, a chain of three responses through the OpenAI SDK: two turns before,
    the third after a restart on the same cache folder (its Redis data), by
    ``previous_response_id``.
    """
    first_run = tmp_path / "first"
    first_run.mkdir()
    served = started(first_run)
    try:
        assert requests.post(f"{served.url}/generate", json={"message": "hi"}).status_code == 200
        turn = {"model": MODEL, "temperature": 0, "max_output_tokens": 8, "store": True}
        # Closed before the stop: a kept-alive connection would hold the port in FIN_WAIT2.
        with sdk(served) as client:
            first = client.responses.create(input="My name is Ada. Say hello.", **turn)
            second = client.responses.create(
                input="Name a colour.", previous_response_id=first.id, **turn
            )
        listening = [
            c.laddr.ip
            for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == served.metrics_port
        ]
        assert listening == ["127.0.0.1"], listening  # not every interface
        body = {"message": "count to a thousand", "max_tokens": 256, "stream": True}
        stream = requests.post(f"{served.url}/generate", json=body, stream=True, timeout=60)
        assert stream.status_code == 200
        # Read as a client does: a stream nobody reads would keep the server's side of the
        # connection, and so the port, in FIN_WAIT after the stop.
        reader = threading.Thread(target=read_out, args=(stream,), daemon=True)
        reader.start()
        took = served.stop((0.0, signal.SIGTERM), (0.1, signal.SIGTERM), group=True)
        reader.join(10)
    finally:
        served.kill()
    output = served.output()
    audit = (served.cache / "run" / "audit.jsonl").read_text().splitlines()
    print(f"\n[group SIGTERM + make's, under a stream] nothing left after {took:.1f} s")
    assert len(audit) >= 3  # the health poll, the answer, the stream
    assert '"route":' not in output and not ACCESS_LINE.search(output), output[-3000:]

    second_run = tmp_path / "second"
    second_run.mkdir()
    again = started(second_run, cache=served.cache)
    try:
        with sdk(again) as client:
            third = client.responses.create(
                input="What is my name?", previous_response_id=second.id, **turn
            )
            kept = client.responses.retrieve(first.id)
            items = client.responses.input_items.list(third.id)
            client.responses.delete(third.id)
            with pytest.raises(openai.NotFoundError):
                client.responses.retrieve(third.id)
        again.stop((0.0, signal.SIGINT))
    finally:
        again.kill()
    usage = [r.usage.input_tokens for r in (first, second, third) if r.usage is not None]
    print(f"\n[responses across a restart] input tokens per turn {usage}: {third.output_text!r}")
    # The history reached the model after the restart: each turn's prompt holds the ones
    # before it (the answers too).
    assert len(usage) == 3 and usage[0] < usage[1] < usage[2]
    assert third.previous_response_id == second.id and third.output_text
    assert kept.output_text == first.output_text
    assert [item.type for item in items.data] == ["message"]


def test_ctrl_c_twice_and_sighup_on_the_simulated_engine(tmp_path: Path) -> None:
    timings = []
    for name, signals in (
        ("SIGINT twice", ((0.0, signal.SIGINT), (1.5, signal.SIGINT))),
        ("SIGHUP", ((0.0, signal.SIGHUP),)),
    ):
        folder = tmp_path / name.replace(" ", "-")
        folder.mkdir()
        served = started(folder, model="sim")
        try:
            timings.append(f"{name}: nothing left after {served.stop(*signals):.1f} s")
        finally:
            served.kill()
        if name == "SIGINT twice":
            assert "hurrying the stop" in served.output()
    print("\n[stop] " + "\n[stop] ".join(timings))
