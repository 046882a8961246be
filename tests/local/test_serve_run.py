"""What ``serve_run`` prints from Serve's status while the app starts, and when it gives up."""

from __future__ import annotations

from types import SimpleNamespace

from cloudllm_serve.devhost.serve_run import failed_apps, failures

TRACEBACK = "Traceback (most recent call last):\n  File 'x.py', line 1\nOSError: no tokenizer"


def status(message: str, deployment: str = "UPDATING", app: str = "DEPLOYING") -> object:
    engine = SimpleNamespace(status=deployment, message=message)
    ingress = SimpleNamespace(status="HEALTHY", message="")
    return SimpleNamespace(
        applications={
            "cloudllm": SimpleNamespace(
                status=app, deployments={"EngineServer": engine, "Ingress": ingress}
            )
        }
    )


def retrying(times: int) -> str:
    return (
        f"A replica failed to start with exception. Retrying {times} more time(s). Error:\n"
        + TRACEBACK
    )


def test_a_failure_is_shown_with_its_traceback_once_then_by_its_last_line() -> None:
    seen: dict[str, tuple[str, str]] = {}
    first = failures(status(retrying(2)), seen)
    assert first == [f"deployment EngineServer (UPDATING): {retrying(2)}"]
    assert failures(status(retrying(2)), seen) == []
    assert failures(status(retrying(1)), seen) == [
        "deployment EngineServer (UPDATING): A replica failed to start with exception. "
        "Retrying 1 more time(s). Error:\nOSError: no tokenizer"
    ]
    assert failures(status("", deployment="UPDATING"), seen) == []
    assert failures(status("scaled", deployment="HEALTHY"), seen) == []


def test_only_an_app_that_never_ran_ends_the_process() -> None:
    ran: set[str] = set()
    assert failed_apps(status(retrying(0), app="DEPLOY_FAILED"), ran) == ["cloudllm"]
    assert failed_apps(status("", app="RUNNING"), ran) == []
    assert ran == {"cloudllm"}
    # Once it has served, a later failure is Serve's to repair: keep running.
    assert failed_apps(status(retrying(0), app="DEPLOY_FAILED"), ran) == []
