"""``ceiling.md`` and ``ceiling.png`` from a ``make bench-ceiling`` report (see :mod:`.ceiling`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: The system our figures are held against, and the floor.
PEER = "ray-llm-50"
FLOOR = "floor"
OURS = "ours"


def _results(report: dict[str, Any], system: str) -> dict[int, dict[str, Any]]:
    for run in report["systems"]:
        if run["system"] == system and not run.get("error"):
            return {int(c): r for c, r in run["results"].items()}
    return {}


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}"


def per_core_tokens(result: dict[str, Any], role: str) -> float | None:
    """Tokens one CPU-second of ``role`` relays: 1e6 / its CPU ms per 1,000 tokens."""
    ms = result.get("cpu_ms_per_1k_tokens", {}).get(role)
    return None if not ms else 1e6 / ms


def headline(report: dict[str, Any]) -> list[str]:
    """The README's figures: relay per ingress core, streams held, added TTFT at 1,000."""
    lines = []
    ours = _results(report, OURS)
    peer = _results(report, PEER)
    floor = _results(report, FLOOR)
    top = max(ours) if ours else None
    if top is not None:
        ingress = per_core_tokens(ours[top], "ingress")
        peer_ingress = per_core_tokens(peer[top], "ingress") if top in peer else None
        lines.append(
            f"- One ingress core relays **{_fmt(ingress, 0)} tokens/s** at {top} streams "
            f"(Ray Serve LLM's ingress: {_fmt(peer_ingress, 0)})."
        )
        ours_cpu = ours[top]["serving_cpu_ms_per_1k_tokens"]
        peer_cpu = peer[top]["serving_cpu_ms_per_1k_tokens"] if top in peer else None
        floor_cpu = floor[top]["serving_cpu_ms_per_1k_tokens"] if top in floor else None
        lines.append(
            f"- Serving-layer CPU per 1,000 tokens at {top} streams: ours {_fmt(ours_cpu)} ms, "
            f"Ray Serve LLM {_fmt(peer_cpu)} ms ({_ratio(ours_cpu, peer_cpu)}x), floor "
            f"{_fmt(floor_cpu)} ms (ours/floor {_ratio(ours_cpu, floor_cpu)}x)."
        )
    hold = report.get("hold")
    if hold and hold.get("result"):
        result = hold["result"]
        lines.append(
            f"- {hold['streams']} streams held at once on one ingress and one engine replica "
            f"({hold['batch']} decoding at a time, a token every {hold['step_ms']:g} ms): "
            f"{result['errors']} errors, added inter-token latency p99 "
            f"{_fmt(hold['added_itl_p99_ms'])} ms."
        )
    return lines


def write_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables."""
    lines = [
        "# The serving layer's ceiling (`make bench-ceiling`)",
        "",
        f"Machine: {report['machine']['cpus']} CPUs, {report['machine']['platform']}. "
        f"Took {report['took_s']:.0f} s. Simulated engine with no compute time "
        f"(`SIM_PRESET=ceiling`), {report['settings']['max_tokens']} tokens per answer; "
        "the simulator imposes no latency, so every figure is the serving layer's. CPU: "
        "CPU-milliseconds per 1,000 tokens the clients received, from /proc, by process "
        "role (the simulator's step loop apart; for the floor, its one process).",
        "",
        "## Headline",
        "",
        *headline(report),
        "",
        "## Every point",
        "",
        "| system | streams | tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | errors | "
        "serving CPU ms/1k tok | proxy / ingress / engine | simulator CPU s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["systems"]:
        if run.get("error"):
            lines.append(f"| {run['system']} | - | failed: {run['error'][:120]} | | | | | | |")
            continue
        for concurrency, r in sorted((int(c), r) for c, r in run["results"].items()):
            per = r["cpu_ms_per_1k_tokens"]
            lines.append(
                f"| {run['system']} | {concurrency} | {r['tokens_per_s']:.0f} | "
                f"{_fmt(r['ttft_ms']['p50'])} / {_fmt(r['ttft_ms']['p99'])} | "
                f"{_fmt(r['itl_ms']['p50'])} / {_fmt(r['itl_ms']['p99'])} | {r['errors']} | "
                f"{r['serving_cpu_ms_per_1k_tokens']} | "
                f"{_fmt(per.get('proxy'))} / {_fmt(per.get('ingress'))} / "
                f"{_fmt(per.get('engine'))} | {r['simulator_cpu_s']} |"
            )
    ours, peer, floor = _results(report, OURS), _results(report, PEER), _results(report, FLOOR)
    lines += [
        "",
        "## Ratios (same run)",
        "",
        "| streams | CPU ours / Ray Serve LLM | CPU ours / floor | TTFT p50 ours / Ray Serve LLM "
        "| tok/s ours / Ray Serve LLM |",
        "|---|---|---|---|---|",
    ]
    for concurrency in sorted(ours):
        o = ours[concurrency]
        p = peer.get(concurrency, {})
        f = floor.get(concurrency, {})
        lines.append(
            f"| {concurrency} | "
            f"{_ratio(o['serving_cpu_ms_per_1k_tokens'], p.get('serving_cpu_ms_per_1k_tokens'))} | "
            f"{_ratio(o['serving_cpu_ms_per_1k_tokens'], f.get('serving_cpu_ms_per_1k_tokens'))} | "
            f"{_ratio(o['ttft_ms']['p50'], (p.get('ttft_ms') or {}).get('p50'))} | "
            f"{_ratio(o['tokens_per_s'], p.get('tokens_per_s'))} |"
        )
    hold = report.get("hold")
    if hold:
        lines += ["", "## Hold test", ""]
        if hold.get("error"):
            lines.append(f"Failed: {hold['error']}")
        else:
            r = hold["result"]
            lines += [
                f"{hold['streams']} streams at once on our stack (coalescing on), one ingress "
                f"and one engine replica; the simulated engine decodes {hold['batch']} at a "
                f"time, a first token {hold['ttft_ms']:g} ms after one is scheduled, then one "
                f"every {hold['step_ms']:g} ms (the others wait for a slot, so TTFT includes "
                "that wait).",
                "",
                "| ok | errors | tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | added ITL p99 ms |",
                "|---|---|---|---|---|---|",
                f"| {r['ok']} | {r['errors']} | {r['tokens_per_s']:.0f} | "
                f"{_fmt(r['ttft_ms']['p50'])} / {_fmt(r['ttft_ms']['p99'])} | "
                f"{_fmt(r['itl_ms']['p50'])} / {_fmt(r['itl_ms']['p99'])} | "
                f"{_fmt(hold['added_itl_p99_ms'])} |",
            ]
    return "\n".join(lines) + "\n"


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Tokens/s, serving CPU per 1,000 tokens and TTFT p50 against streams, per system."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the bench extra is not installed: tables only
        return
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = (
        ("tokens/s received", lambda r: r["tokens_per_s"]),
        ("serving CPU ms / 1k tokens", lambda r: r["serving_cpu_ms_per_1k_tokens"]),
        ("TTFT p50 (ms)", lambda r: r["ttft_ms"]["p50"]),
    )
    for axis, (title, value) in zip(axes, panels, strict=True):
        for run in report["systems"]:
            if run.get("error"):
                continue
            points = sorted((int(c), value(r)) for c, r in run["results"].items())
            axis.plot(
                [c for c, _ in points], [v for _, v in points], marker="o", label=run["system"]
            )
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent streams")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
