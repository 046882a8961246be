r"""A cheap streaming load generator for OpenAI-compatible chat completion servers.

    python -m benchmarks.loadgen --url http://127.0.0.1:8000 --model sim \\
        --concurrency 1024 --requests 8192 --max-tokens 128 --prompt-words 32 \\
        --out result.json [--processes 2] [--timeout-s 300] [--warmup 0] [--raw]

Keeps exactly ``--concurrency`` streaming ``POST /v1/chat/completions`` requests in
flight (a pool of that many workers, each sending its next request as soon as its
previous one ends) until ``--requests`` have been sent, and writes what it measured as
JSON (see :func:`summarize` for the fields).

It is built to cost little CPU per token, since it shares the machine with the system
under test: the body is read as network chunks (``readany``), and each chunk is only
searched for byte markers (content events are counted by their ``"delta":{"content"``,
the end by ``data: [DONE]``); JSON is parsed once per request, for the usage event
(``usage.completion_tokens``) or an error event. An SSE event split across reads is
counted when its end (a blank line) arrives.

Per request: TTFT is the time from sending it to the first chunk with a content event;
each later content event gives one inter-token latency sample, the gap since the
previous chunk with content events (the second and later content events of one chunk
get 0). ``--processes K`` spreads the workers and requests over K processes (started
together after their warm-up), whose samples are merged.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import queue
import random
import resource
import sys
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

CHAT_PATH = "/v1/chat/completions"
#: What marks a content event (a token) in a chunk: compact JSON, as vLLM writes it,
#: and with spaces, as ``json.dumps`` writes it by default.
CONTENT_MARKERS = (b'"delta":{"content"', b'"delta": {"content"')
DONE_MARKER = b"data: [DONE]"
USAGE_MARKER = b'"usage"'
ERROR_MARKER = b'data: {"error"'
#: Distinct error texts kept in the summary.
ERROR_EXAMPLES = 5
#: Characters kept of an error text (an HTTP error's body, an error event).
ERROR_TEXT_CHARS = 300
#: How long a child process waits for the others to finish their warm-up.
START_BARRIER_TIMEOUT_S = 600.0

_WORD_TEXT = (
    "river mountain lantern copper orchard signal harbor velvet meadow engine quartz falcon "
    "ribbon glacier thunder saddle marble pepper canyon willow anchor basket cobalt dragon "
    "ember feather garden hollow island jasmine kettle ladder mirror needle oyster pillow "
    "rocket shadow timber umbrella violet walnut yellow zephyr bridge candle desert forest"
)
#: What prompts are made of.
WORDS = tuple(_WORD_TEXT.split())


@dataclass
class RequestResult:
    """What one request measured; times are ``time.perf_counter()`` unless said."""

    index: int
    #: Wall clock (``time.time()``) when it was sent and when it ended, so that the
    #: results of several processes can be put on one time line.
    start: float
    end: float
    status: int = 0
    error: str | None = None
    #: ``perf_counter()`` when it was sent.
    sent: float = 0.0
    #: Arrival time of each network chunk that held content events, and how many.
    chunk_times: array[float] = field(default_factory=lambda: array("d"))
    chunk_events: array[int] = field(default_factory=lambda: array("q"))
    #: ``usage.completion_tokens``, when the stream had a usage event.
    usage_tokens: int | None = None
    #: Network chunks read from the body (all of them, content or not).
    reads: int = 0

    @property
    def ok(self) -> bool:
        """Whether it was answered 200 and streamed to ``[DONE]`` without an error."""
        return self.error is None

    @property
    def events(self) -> int:
        """Content events received."""
        return int(sum(self.chunk_events))

    @property
    def tokens(self) -> int:
        """Tokens generated: the usage event's count, else the content events counted."""
        return self.usage_tokens if self.usage_tokens is not None else self.events

    @property
    def ttft_s(self) -> float | None:
        """Time to the first chunk with a content event, in seconds."""
        return self.chunk_times[0] - self.sent if self.chunk_times else None

    def itl_s_after(self, moment: float) -> np.ndarray:
        """The :meth:`itl_s` samples of the tokens that arrived at ``moment`` or later."""
        if not self.chunk_times:
            return np.zeros(0)
        times = np.frombuffer(self.chunk_times, dtype=np.float64)
        counts = np.frombuffer(self.chunk_events, dtype=np.int64)
        arrived = np.repeat(times, counts)[1:]  # each sample's token's arrival
        return self.itl_s()[arrived >= moment]

    def itl_s(self) -> np.ndarray:
        """Inter-token latency samples, in seconds, in arrival order (events - 1 of them).

        Each chunk after the first gives its gap since the previous chunk, then one 0 per
        further content event in it; the first chunk gives one 0 per event after its first.
        """
        if not self.chunk_times:
            return np.zeros(0)
        times = np.frombuffer(self.chunk_times, dtype=np.float64)
        counts = np.frombuffer(self.chunk_events, dtype=np.int64)
        samples = np.zeros(int(counts.sum()) - 1)
        # Chunk i (i >= 1) opens at sample cumsum(counts)[i - 1] - 1.
        samples[np.cumsum(counts)[:-1] - 1] = np.diff(times)
        return samples


@dataclass
class ProcessResult:
    """One process's measured requests and the CPU time it spent measuring them."""

    results: list[RequestResult]
    cpu_s: float


# The request ------------------------------------------------------------------------


def prompt(index: int, words: int, tag: str = "r") -> str:
    """A user message of ``words`` words, distinct per ``index`` (it names the index)."""
    rng = random.Random(f"{tag}{index}")
    return " ".join([f"{tag}{index}", *rng.choices(WORDS, k=max(0, words - 1))])


def request_body(index: int, model: str, max_tokens: int, prompt_words: int, tag: str) -> bytes:
    """The JSON body of one streaming chat completion request."""
    return json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": prompt(index, prompt_words, tag)}],
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()


def chat_url(url: str) -> str:
    """The chat completions URL of a server's base URL (kept if it is one already)."""
    url = url.rstrip("/")
    return url if url.endswith(CHAT_PATH) else url + CHAT_PATH


def _event_end(data: bytes) -> int:
    """Where the last complete SSE event in ``data`` ends (0 if none does)."""
    cut = data.rfind(b"\n\n")
    if cut >= 0:
        return cut + 2
    cut = data.rfind(b"\n\r\n")
    return cut + 3 if cut >= 0 else 0


def _last_event_with(data: bytes, marker: bytes) -> bytes:
    """The JSON of the last ``data:`` event in ``data`` holding ``marker``."""
    at = data.rfind(marker)
    start = data.rfind(b"data:", 0, at)
    end = data.find(b"\n", at)
    return data[start + 5 : end if end >= 0 else len(data)].strip()


def _first_event_with(data: bytes, marker: bytes) -> bytes:
    """The JSON of the first ``data:`` event in ``data`` starting with ``marker``."""
    at = data.find(marker)
    end = data.find(b"\n", at)
    return data[at + 5 : end if end >= 0 else len(data)].strip()


def _usage_tokens(event: bytes) -> int | None:
    try:
        usage = json.loads(event).get("usage")
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    except (ValueError, AttributeError):
        return None
    return tokens if isinstance(tokens, int) else None


def _error_text(event: bytes) -> str:
    try:
        error = json.loads(event).get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    text = event.decode(errors="replace") if message is None else str(message)
    return f"error event: {text}"[:ERROR_TEXT_CHARS]


class StreamScan:
    """Counts the content events of an SSE body fed to it one network chunk at a time.

    Only byte searches per chunk; an event split across chunks counts when its blank
    line arrives. The usage and error events are kept as bytes, to parse once.
    """

    __slots__ = ("done", "error_event", "events", "reads", "tail", "times", "usage_event")

    def __init__(self) -> None:
        self.times: list[float] = []
        self.events: list[int] = []
        self.usage_event = b""
        self.error_event = b""
        self.done = False
        self.reads = 0
        self.tail = b""

    def feed(self, data: bytes, now: float) -> None:
        """Take one chunk of the body, which arrived at ``now``."""
        self.reads += 1
        if self.tail:
            data = self.tail + data
        cut = _event_end(data)
        if cut != len(data):
            self.tail = data[cut:]
            if not cut:
                return
            data = data[:cut]
        elif self.tail:
            self.tail = b""
        self._scan(data, now)

    def finish(self, now: float) -> None:
        """The body has ended: count a last event that came without its blank line."""
        if self.tail.strip():
            self._scan(self.tail, now)
        self.tail = b""

    def _scan(self, data: bytes, now: float) -> None:
        n = data.count(CONTENT_MARKERS[0]) or data.count(CONTENT_MARKERS[1])
        if n:
            self.times.append(now)
            self.events.append(n)
        if USAGE_MARKER in data:
            self.usage_event = _last_event_with(data, USAGE_MARKER)
        if ERROR_MARKER in data and not self.error_event:
            self.error_event = _first_event_with(data, ERROR_MARKER)
        if DONE_MARKER in data:
            self.done = True


async def send_one(
    session: aiohttp.ClientSession, url: str, body: bytes, index: int
) -> RequestResult:
    """Send one streaming request and measure it (never raises but for cancellation)."""
    result = RequestResult(index=index, start=time.time(), end=0.0)
    perf = time.perf_counter
    scan = StreamScan()
    result.sent = perf()
    try:
        async with session.post(url, data=body, headers=_HEADERS) as resp:
            result.status = resp.status
            if resp.status != 200:
                text = (await resp.read()).decode(errors="replace")
                result.error = f"HTTP {resp.status}: {text}"[:ERROR_TEXT_CHARS]
            else:
                feed, read = scan.feed, resp.content.readany
                while data := await read():  # what has arrived (iter_any without its wrapper)
                    feed(data, perf())
                scan.finish(perf())
                if scan.error_event:
                    result.error = _error_text(scan.error_event)
                elif not scan.done:
                    result.error = "stream ended without data: [DONE]"
    except Exception as exc:  # connection refused or reset, timeout...
        result.error = f"{type(exc).__name__}: {exc}"[:ERROR_TEXT_CHARS]
    result.end = time.time()
    result.chunk_times = array("d", scan.times)
    result.chunk_events = array("q", scan.events)
    result.usage_tokens = _usage_tokens(scan.usage_event) if scan.usage_event else None
    result.reads = scan.reads
    return result


_HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}


# One process --------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadSpec:
    """What one process sends (a share of the whole run when there are several)."""

    url: str
    model: str
    concurrency: int
    requests: int
    max_tokens: int
    prompt_words: int
    timeout_s: float
    warmup: int = 0
    #: The first request index, so that several processes send distinct prompts.
    first_index: int = 0
    api_key: str | None = None
    #: The workers start evenly over this many seconds (0: all at once).
    ramp_s: float = 0.0


async def _pool(
    session: aiohttp.ClientSession,
    spec: LoadSpec,
    requests: int,
    concurrency: int,
    first_index: int,
    tag: str,
) -> list[RequestResult]:
    """Run ``requests`` requests with ``concurrency`` of them in flight at all times."""
    url = chat_url(spec.url)
    indices: Iterator[int] = itertools.count(first_index)
    last = first_index + requests
    results: list[RequestResult] = []

    workers = min(concurrency, requests)

    async def worker(number: int) -> None:
        if spec.ramp_s > 0:
            await asyncio.sleep(spec.ramp_s * number / workers)
        while (index := next(indices)) < last:
            body = request_body(index, spec.model, spec.max_tokens, spec.prompt_words, tag)
            results.append(await send_one(session, url, body, index))

    await asyncio.gather(*(worker(number) for number in range(workers)))
    results.sort(key=lambda r: r.index)
    return results


async def run_process(spec: LoadSpec, ready: Callable[[], object] | None = None) -> ProcessResult:
    """Warm up, call ``ready`` (blocking; run in a thread), then run the measured load."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else None
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers=headers
    ) as session:
        if spec.warmup > 0:
            await _pool(session, spec, spec.warmup, spec.concurrency, spec.first_index, "w")
        if ready is not None:
            await asyncio.to_thread(ready)
        cpu_before = _cpu_s()
        results = await _pool(session, spec, spec.requests, spec.concurrency, spec.first_index, "r")
        return ProcessResult(results=results, cpu_s=_cpu_s() - cpu_before)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def event_loop_name() -> str:
    """``uvloop`` when it is installed (it is used then), else ``asyncio``."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def _run_in_loop(spec: LoadSpec, ready: Callable[[], object] | None = None) -> ProcessResult:
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if event_loop_name() == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(run_process(spec, ready))


def raise_nofile_limit() -> int:
    """Raise this process's open-files soft limit to its hard limit; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard
    if hard == resource.RLIM_INFINITY:
        try:
            wanted = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            wanted = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError):
        return soft
    return wanted


# Several processes ----------------------------------------------------------------------


def split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` shares that differ by at most one, larger ones first."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _child(
    number: int,
    spec: LoadSpec,
    barrier: Barrier,
    results: Queue[tuple[int, ProcessResult | str]],
) -> None:
    """A child process's body: its share of the load, handed back through ``results``."""
    raise_nofile_limit()
    try:
        outcome: ProcessResult | str = _run_in_loop(
            spec, lambda: barrier.wait(START_BARRIER_TIMEOUT_S)
        )
    except BaseException as exc:
        barrier.abort()
        outcome = f"{type(exc).__name__}: {exc}"
    results.put((number, outcome))


def _run_processes(specs: list[LoadSpec]) -> list[ProcessResult]:
    """Run each spec in a process of its own (spawned), all starting together."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(specs))
    results: Queue[tuple[int, ProcessResult | str]] = context.Queue()
    children = [
        context.Process(
            target=_child, args=(n, spec, barrier, results), name=f"loadgen-{n}", daemon=True
        )
        for n, spec in enumerate(specs)
    ]
    for child in children:
        child.start()
    got: dict[int, ProcessResult | str] = {}
    try:
        while len(got) < len(children):
            try:
                number, outcome = results.get(timeout=1.0)
                got[number] = outcome
            except queue.Empty:
                dead = [
                    c.name
                    for n, c in enumerate(children)
                    if n not in got and c.exitcode is not None
                ]
                if dead:
                    barrier.abort()
                    raise RuntimeError(f"load generator processes died: {dead}") from None
    finally:
        for child in children:
            child.join(timeout=10)
            if child.is_alive():
                child.terminate()
    failed = [f"process {n}: {o}" for n, o in sorted(got.items()) if isinstance(o, str)]
    if failed:
        raise RuntimeError("; ".join(failed))
    return [o for _, o in sorted(got.items()) if isinstance(o, ProcessResult)]


# The whole run -----------------------------------------------------------------------------


def run_load(
    url: str,
    model: str,
    concurrency: int,
    requests: int,
    max_tokens: int = 128,
    prompt_words: int = 32,
    timeout_s: float = 300.0,
    processes: int = 1,
    *,
    warmup: int = 0,
    raw: bool = False,
    api_key: str | None = None,
    ramp_s: float = 0.0,
) -> dict[str, Any]:
    """Run the load against ``url`` (a server's base URL) and summarize it.

    ``processes`` > 1 splits ``concurrency``, ``requests`` and ``warmup`` over that many
    spawned processes, which start their measured requests together. ``warmup``
    requests per run are sent first (at most ``concurrency`` at once) and not counted.
    ``ramp_s``: the workers start evenly over that many seconds, and ``itl_after_ramp_ms``
    counts only the tokens that arrived after it. Returns :func:`summarize`'s dict.
    """
    if concurrency < 1 or requests < 1 or processes < 1:
        raise ValueError("concurrency, requests and processes must be at least 1")
    raise_nofile_limit()
    processes = min(processes, concurrency, requests)
    spec = LoadSpec(
        url,
        model,
        concurrency,
        requests,
        max_tokens,
        prompt_words,
        timeout_s,
        warmup,
        0,
        api_key,
        ramp_s,
    )
    if processes == 1:
        outcomes = [_run_in_loop(spec)]
    else:
        shares = split(requests, processes)
        firsts = itertools.accumulate([0, *shares[:-1]])
        specs = [
            replace(spec, concurrency=c, requests=r, warmup=w, first_index=first)
            for c, r, w, first in zip(
                split(concurrency, processes),
                shares,
                split(warmup, processes),
                firsts,
                strict=True,
            )
        ]
        outcomes = _run_processes(specs)
    summary = summarize(
        [r for o in outcomes for r in o.results], concurrency=concurrency, raw=raw, ramp_s=ramp_s
    )
    summary["processes"] = processes
    summary["loadgen_cpu_s"] = round(sum(o.cpu_s for o in outcomes), 3)
    summary["event_loop"] = event_loop_name()
    summary["url"] = chat_url(url)
    summary["model"] = model
    summary["max_tokens"] = max_tokens
    summary["prompt_words"] = prompt_words
    return summary


def _stats_ms(seconds: np.ndarray) -> dict[str, float | None]:
    """p50, p99 and mean of ``seconds``, in milliseconds (None when there is none)."""
    if seconds.size == 0:
        return {"p50": None, "p99": None, "mean": None}
    ms = seconds * 1000.0
    return {
        "p50": round(float(np.percentile(ms, 50)), 3),
        "p99": round(float(np.percentile(ms, 99)), 3),
        "mean": round(float(ms.mean()), 3),
    }


def summarize(
    results: Sequence[RequestResult], concurrency: int, raw: bool = False, ramp_s: float = 0.0
) -> dict[str, Any]:
    """The run's figures, as written to ``--out``.

    * ``concurrency``, ``requests`` (sent), ``ok``, ``errors`` and ``error_examples``
      (up to 5 distinct texts);
    * ``duration_s``: from the first request sent to the last one ended (wall clock);
    * ``output_tokens``: tokens of the successful requests (``usage.completion_tokens``,
      else their content events), and ``tokens_per_s`` = output_tokens / duration_s;
    * ``ttft_ms`` and ``itl_ms``: ``p50``, ``p99``, ``mean`` over successful requests;
    * ``chunks_per_request``: mean network reads per successful request (every read);
    * ``events_per_chunk``: content events per read that held any (batching shows here);
    * ``itl_after_ramp_ms`` (with ``ramp_s``): ``itl_ms`` of the tokens that arrived once
      every worker had started (the steady state, without the arrival of the streams);
    * ``raw`` (only if asked): one dict per request.
    """
    ok = [r for r in results if r.ok]
    errors = [r for r in results if not r.ok]
    examples: list[str] = []
    for r in errors:
        if r.error is not None and r.error not in examples:
            examples.append(r.error)
            if len(examples) == ERROR_EXAMPLES:
                break
    duration = max(r.end for r in results) - min(r.start for r in results) if results else 0.0
    tokens = sum(r.tokens for r in ok)
    ttft = np.array([t for r in ok if (t := r.ttft_s) is not None])
    itls = [r.itl_s() for r in ok]
    itl = np.concatenate(itls) if itls else np.zeros(0)
    content_reads = sum(len(r.chunk_times) for r in ok)
    summary: dict[str, Any] = {
        "concurrency": concurrency,
        "requests": len(results),
        "ok": len(ok),
        "errors": len(errors),
        "error_examples": examples,
        "duration_s": round(duration, 3),
        "output_tokens": tokens,
        "tokens_per_s": round(tokens / duration, 1) if duration > 0 else 0.0,
        "requests_per_s": round(len(ok) / duration, 2) if duration > 0 else 0.0,
        "ttft_ms": _stats_ms(ttft),
        "itl_ms": _stats_ms(itl),
        "chunks_per_request": round(sum(r.reads for r in ok) / len(ok), 2) if ok else None,
        "events_per_chunk": (
            round(sum(r.events for r in ok) / content_reads, 3) if content_reads else None
        ),
    }
    if ramp_s > 0 and ok:
        steady_from = min(r.sent for r in ok) + ramp_s
        steady = [r.itl_s_after(steady_from) for r in ok]
        summary["ramp_s"] = ramp_s
        summary["itl_after_ramp_ms"] = _stats_ms(np.concatenate(steady))
    if raw:
        summary["raw"] = [_raw(r) for r in results]
    return summary


def _raw(r: RequestResult) -> dict[str, Any]:
    ttft = r.ttft_s
    return {
        "index": r.index,
        "start": r.start,
        "end": r.end,
        "status": r.status,
        "error": r.error,
        "ttft_ms": round(ttft * 1000.0, 3) if ttft is not None else None,
        "tokens": r.tokens,
        "events": r.events,
        "chunks": r.reads,
        "itl_ms": [round(float(x) * 1000.0, 3) for x in r.itl_s()],
    }


# Command line ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.loadgen",
        description="Streaming chat-completion load at a fixed concurrency; JSON results.",
    )
    parser.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", required=True, help="model name sent in each request")
    parser.add_argument("--concurrency", type=int, required=True, help="requests in flight")
    parser.add_argument("--requests", type=int, required=True, help="measured requests in all")
    parser.add_argument("--max-tokens", type=int, default=128, help="max_tokens per request")
    parser.add_argument("--prompt-words", type=int, default=32, help="words per user message")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="limit per request")
    parser.add_argument("--warmup", type=int, default=0, help="uncounted requests sent first")
    parser.add_argument("--processes", type=int, default=1, help="load generator processes")
    parser.add_argument("--api-key", default=None, help="sent as Authorization: Bearer")
    parser.add_argument("--raw", action="store_true", help="add per-request results")
    parser.add_argument(
        "--ramp-s", type=float, default=0.0, help="start the workers evenly over this long"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: stdout)")
    args = parser.parse_args(argv)
    for name in ("concurrency", "requests", "processes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the load the command line describes; write the JSON; 0 once it has run."""
    args = parse_args(argv)
    summary = run_load(
        args.url,
        args.model,
        args.concurrency,
        args.requests,
        args.max_tokens,
        args.prompt_words,
        args.timeout_s,
        args.processes,
        warmup=args.warmup,
        ramp_s=args.ramp_s,
        raw=args.raw,
        api_key=args.api_key,
    )
    text = json.dumps(summary, indent=2)
    if args.out is None:
        print(text)
    else:
        args.out.write_text(text + "\n")
    print(
        f"loadgen: {summary['ok']}/{summary['requests']} ok, {summary['tokens_per_s']} tok/s, "
        f"TTFT p50 {summary['ttft_ms']['p50']} ms, ITL p50 {summary['itl_ms']['p50']} ms, "
        f"loadgen CPU {summary['loadgen_cpu_s']} s over {summary['duration_s']} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    from benchmarks import loadgen as _self  # spawned children unpickle from here

    sys.exit(_self.main())
