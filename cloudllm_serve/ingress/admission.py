"""Deadline-aware admission: refuse at once what the engines cannot finish in time.

Each ingress replica keeps one :class:`DeadlineAdmission`. A background task
(:meth:`DeadlineAdmission.run`) asks the engine fleet for its stats every
``ADMISSION_POLL_INTERVAL_S`` (never per request; a failed poll keeps the last view,
and a view older than :data:`STALE_AFTER_S` counts as none) and
:class:`ThroughputMeter` turns successive stats into two rates measured over the last
:data:`WINDOW_S`: the slot-seconds an engine spends per generated token (the time of
one decode step, prefill amortised in), measured apart at a full batch (where a step
is slowest), and the tokens an answer has on average. Steps that slow down (a flood's
own work, or a neighbour taking the CPU) count at once: the step used is the slower
of the window's and the last :data:`RECENT_S`'s, so what is admitted after the
slowdown is reckoned at the new pace, not at a window's average of the old one.

A request's admission is O(1): it is ``ahead`` requests behind those in the system
(the engines' running and waiting ones at the last poll, moved by this replica's own
admissions and completions since), on ``slots`` batch slots (``max_num_seqs`` summed
over the running replicas). With a free slot it starts at once; else it waits for the
work ahead (running answers half done, waiting ones whole, this replica's queued ones
at their ``max_tokens``) to drain through the slots, then runs its own ``max_tokens``
decode steps. When that comes past ``REQUEST_TIMEOUT_S`` less a margin, it is refused
with :class:`~cloudllm_serve.errors.EngineOverloadedError` (reason ``deadline``), its
``Retry-After`` the time the backlog needs to shrink until it would fit. Without stats
(start-up, or no poll answered lately) everything is admitted, as before; the count
bound (``ENGINE_MAX_QUEUED_REQUESTS``, Serve's ``max_queued_requests``) stays the hard
cap either way.

An admitted request that had to wait for a slot is checked again while it waits
(:meth:`DeadlineAdmission.too_late_to_start`): once it could no longer run its
``max_tokens`` before its deadline at the step measured now (the engines slowed after
it was admitted), it is refused then, still before any byte, with reason ``late`` and
the same ``Retry-After``; a 503 in seconds, not a 504 at the timeout.

Why no wait queue of our own: admitted requests wait in Serve's handle queue, which
serves them first come, first served (the router's ``FIFOMixin``), so one admitted
earlier is never overtaken by one admitted later; an admission that counts everything
ahead of it cannot push an earlier one past its deadline. What a queue would add is
reordering between tenants, and a share of admitted requests gets that simply: while
the fleet is full and several tenants are active (with requests in flight here, or
seen within :data:`TENANT_ACTIVE_S`), a tenant may hold at most an equal share of what
this replica can admit in time (reason ``tenant_share``). A tenant alone may use it all;
once another one asks, the flooding tenant's new requests are refused until its
earlier ones drain below its share, and the room that frees goes to the others.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cloudllm_serve.engine.protocol import EngineFleet, EngineStats
from cloudllm_serve.errors import EngineOverloadedError
from cloudllm_serve.settings import Settings

logger = logging.getLogger(__name__)

#: Seconds of engine stats the rates are measured over.
WINDOW_S = 10.0
#: A step slower over this last stretch of the window counts at once.
RECENT_S = 2.0
#: A poll counts as full-batch when this share of the slots was busy through it.
FULL_BATCH = 0.75
#: Stats older than this (no poll answered) count as none: admit.
STALE_AFTER_S = 10.0
#: Room left before ``REQUEST_TIMEOUT_S``: this share of it, plus :data:`MARGIN_S`.
MARGIN_SHARE = 0.05
MARGIN_S = 0.5
#: A tenant counts as active this long after it last asked.
TENANT_ACTIVE_S = 30.0
#: Refusals counted for the autoscaler over this long (see ``refused_demand``).
DEMAND_WINDOW_S = 10.0


@dataclass(frozen=True)
class _Sample:
    """What one poll added: busy slot-seconds, tokens and answers finished since the last."""

    at: float
    slot_seconds: float
    tokens: int
    finished: int
    full: bool


class ThroughputMeter:
    """Seconds per token per batch slot and tokens per answer, from successive stats.

    Each replica's counters are differenced against its previous poll (a replica new or
    restarted since contributes from its next poll on); busy slot-seconds are the
    replica's running requests, averaged over the two polls, times the time between.
    """

    def __init__(self, window_s: float = WINDOW_S, recent_s: float = RECENT_S) -> None:
        self.window_s = window_s
        self.recent_s = recent_s
        self._previous: dict[str, tuple[float, EngineStats]] = {}
        self._samples: deque[_Sample] = deque()
        #: Last measured values, kept while the engines are idle.
        self.seconds_per_token: float | None = None
        self.seconds_per_token_full: float | None = None
        #: Over the last ``recent_s`` only (full-batch polls where there are some).
        self.seconds_per_token_recent: float | None = None
        self.tokens_per_answer: float | None = None

    def observe(self, stats: Sequence[EngineStats], now: float) -> None:
        """Take in one poll's stats (of the running replicas), taken at ``now``."""
        slot_seconds = 0.0
        tokens = finished = 0
        busy = slots = 0.0
        current: dict[str, tuple[float, EngineStats]] = {}
        for replica in stats:
            current[replica.replica_id] = (now, replica)
            previous = self._previous.get(replica.replica_id)
            if previous is None:
                continue
            then, old = previous
            new_tokens = replica.tokens_generated - old.tokens_generated
            new_finished = replica.requests_finished - old.requests_finished
            if new_tokens < 0 or new_finished < 0 or now <= then:
                continue  # restarted under the same id: counters began again
            running = (old.running_requests + replica.running_requests) / 2
            slot_seconds += running * (now - then)
            tokens += new_tokens
            finished += new_finished
            busy += running
            slots += replica.max_num_seqs
        self._previous = current
        if slots:
            self._samples.append(
                _Sample(now, slot_seconds, tokens, finished, busy >= FULL_BATCH * slots)
            )
        while self._samples and self._samples[0].at < now - self.window_s:
            self._samples.popleft()
        self._measure()

    def _measure(self) -> None:
        for full_only in (False, True):
            rate = _rate([s for s in self._samples if s.full or not full_only])
            if rate is not None:
                if full_only:
                    self.seconds_per_token_full = rate
                else:
                    self.seconds_per_token = rate
        if self._samples:
            horizon = self._samples[-1].at - self.recent_s
            recent = [s for s in self._samples if s.at > horizon]
            full = [s for s in recent if s.full]
            self.seconds_per_token_recent = _rate(full or recent)
        finished = sum(s.finished for s in self._samples)
        if finished:
            self.tokens_per_answer = sum(s.tokens for s in self._samples) / finished

    def step_s(self) -> float | None:
        """Seconds per token of a sequence in a full batch (else at the load measured).

        The slower of the window's rate and the last ``recent_s``'s.
        """
        step = self.seconds_per_token_full or self.seconds_per_token
        if step is None or self.seconds_per_token_recent is None:
            return step
        return max(step, self.seconds_per_token_recent)


def _rate(samples: Sequence[_Sample]) -> float | None:
    """Busy slot-seconds per token over ``samples`` (``None`` without tokens)."""
    tokens = sum(s.tokens for s in samples)
    return sum(s.slot_seconds for s in samples) / tokens if tokens else None


@dataclass(frozen=True)
class DeadlineEstimate:
    """How long a request would wait for a batch slot and then run, against its budget."""

    wait_s: float
    run_s: float
    budget_s: float
    #: Requests ahead of it (engines' and this replica's queued), and the batch slots.
    ahead: int
    slots: int

    @property
    def total_s(self) -> float:
        """Waiting and running."""
        return self.wait_s + self.run_s

    @property
    def starts_at_once(self) -> bool:
        """Whether a batch slot is free for it."""
        return self.ahead < self.slots

    @property
    def fits(self) -> bool:
        """Admit: it starts at once, or it finishes within the budget."""
        return self.starts_at_once or self.total_s <= self.budget_s

    @property
    def retry_after_s(self) -> int:
        """When to ask again: the backlog drained enough to fit (or, never fitting, a slot)."""
        late = self.total_s - self.budget_s if self.run_s <= self.budget_s else self.wait_s
        return max(1, math.ceil(late))


@dataclass
class AdmissionTicket:
    """One admitted request of this replica, until :meth:`release` (idempotent)."""

    admission: DeadlineAdmission
    tenant: str | None
    max_tokens: int
    #: It had to wait for a batch slot (check it again while it waits for its start).
    queued: bool = False
    released: bool = False

    def release(self) -> None:
        """The request is done (answered, failed or cancelled)."""
        if not self.released:
            self.released = True
            self.admission._release(self)


@dataclass
class _TenantLoad:
    in_flight: int = 0
    last_seen: float = 0.0


@dataclass
class DeadlineAdmission:
    """Admission by deadline and fair share on one ingress replica (module docstring)."""

    settings: Settings
    clock: Callable[[], float] = time.monotonic
    meter: ThroughputMeter = field(default_factory=ThroughputMeter)
    #: This replica's admitted, unfinished requests and their ``max_tokens`` summed.
    own: int = 0
    own_max_tokens: int = 0
    #: Fleet view at the last poll: batch slots, engine-side requests, when.
    slots: int = 0
    ongoing_cap: int = 0
    engine_requests: int = 0
    polled_at: float | None = None
    _own_at_poll: int = 0
    _tenants: dict[str, _TenantLoad] = field(default_factory=dict)
    _active_tenants: int = 0
    _refusals: deque[float] = field(default_factory=deque)
    _task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        """Off with ``ADMISSION_POLL_INTERVAL_S=0``."""
        return self.settings.ADMISSION_POLL_INTERVAL_S > 0

    def observe(self, stats: Sequence[EngineStats]) -> None:
        """Take in the running replicas' stats (from the background poll)."""
        now = self.clock()
        self.meter.observe(stats, now)
        self.slots = sum(s.max_num_seqs for s in stats)
        self.ongoing_cap = 2 * self.slots  # placement.max_ongoing_requests per replica
        self.engine_requests = sum(s.running_requests + s.pending_requests for s in stats)
        self.polled_at = now
        self._own_at_poll = self.own
        horizon = now - TENANT_ACTIVE_S
        self._tenants = {
            name: load
            for name, load in self._tenants.items()
            if load.in_flight or load.last_seen >= horizon
        }
        self._active_tenants = len(self._tenants)
        while self._refusals and self._refusals[0] < now - DEMAND_WINDOW_S:
            self._refusals.popleft()

    def _fresh_step_s(self) -> float | None:
        """The measured step (:meth:`ThroughputMeter.step_s`); ``None`` without fresh stats."""
        step_s = self.meter.step_s()
        stale = self.polled_at is None or self.clock() - self.polled_at > STALE_AFTER_S
        return None if stale else step_s

    def _budget_s(self) -> float:
        """``REQUEST_TIMEOUT_S`` less the margin."""
        return self.settings.REQUEST_TIMEOUT_S * (1 - MARGIN_SHARE) - MARGIN_S

    def estimate(self, max_tokens: int) -> DeadlineEstimate | None:
        """The estimate for a new request of ``max_tokens``; ``None`` without fresh stats."""
        step_s = self._fresh_step_s()
        if step_s is None or not self.slots:
            return None
        ahead = max(self.own, self.engine_requests + self.own - self._own_at_poll)
        in_engines = min(ahead, self.ongoing_cap)
        running = min(in_engines, self.slots)
        own_answer = self.own_max_tokens / self.own if self.own else float(max_tokens)
        answer = self.meter.tokens_per_answer or own_answer
        if self.own >= self.engine_requests:
            # The engines hold (about) only this replica's requests, whose max_tokens bound
            # their answers. The measured mean overstates answers at a burst's start: its
            # window then holds the tokens of many answers and the ends of few.
            answer = min(answer, own_answer)
        work = (
            running * answer / 2
            + (in_engines - running) * answer
            + (ahead - in_engines) * own_answer
        )
        wait_s = 0.0 if ahead < self.slots else work * step_s / self.slots
        return DeadlineEstimate(wait_s, max_tokens * step_s, self._budget_s(), ahead, self.slots)

    def admit(self, tenant: str | None, max_tokens: int) -> AdmissionTicket:
        """Admit a request of ``max_tokens`` for ``tenant``, or raise ``EngineOverloadedError``.

        ``max_tokens``: the most it may generate (``n`` choices and prompts included).
        """
        estimate = self.estimate(max_tokens) if self.enabled else None
        load: _TenantLoad | None = None
        if tenant is not None:
            load = self._tenants.get(tenant)
            if load is None:
                load = self._tenants[tenant] = _TenantLoad()
                self._active_tenants += 1
            load.last_seen = self.clock()
        if estimate is not None and not estimate.fits:
            raise self._refuse(
                "deadline",
                f"the engines could not finish this request within REQUEST_TIMEOUT_S "
                f"({self.settings.REQUEST_TIMEOUT_S:g} s): about {estimate.wait_s:.0f} s of "
                f"waiting behind {estimate.ahead} requests on {estimate.slots} batch slots, "
                f"then about {estimate.run_s:.0f} s for max_tokens={max_tokens}; "
                f"retry in {estimate.retry_after_s} s or ask for fewer tokens",
                estimate.retry_after_s,
            )
        if estimate is not None and load is not None and not estimate.starts_at_once:
            self._check_share(load, estimate, max_tokens)
        self.own += 1
        self.own_max_tokens += max_tokens
        if load is not None:
            load.in_flight += 1
        queued = estimate is not None and not estimate.starts_at_once
        return AdmissionTicket(self, tenant, max_tokens, queued=queued)

    def too_late_to_start(
        self, ticket: AdmissionTicket, seconds_left: float
    ) -> EngineOverloadedError | None:
        """The refusal for a request not started yet that can no longer finish in time.

        ``seconds_left``: until its ``REQUEST_TIMEOUT_S`` deadline. It runs its
        ``max_tokens`` at the step measured now; ``None`` while that still fits (with
        the admission's margin) or without fresh stats.
        """
        step_s = self._fresh_step_s() if self.enabled else None
        if step_s is None:
            return None
        timeout = self.settings.REQUEST_TIMEOUT_S
        run_s = ticket.max_tokens * step_s
        if run_s + (timeout - self._budget_s()) <= seconds_left:
            return None
        probe = self.estimate(ticket.max_tokens)
        retry_after = probe.retry_after_s if probe is not None else max(1, math.ceil(run_s))
        return self._refuse(
            "late",
            f"the engines slowed down after this request was admitted: it has not started "
            f"and could no longer finish within REQUEST_TIMEOUT_S ({timeout:g} s) "
            f"(about {run_s:.0f} s for max_tokens={ticket.max_tokens}, {seconds_left:.0f} s "
            f"left); retry in {retry_after} s or ask for fewer tokens",
            retry_after,
        )

    def _check_share(self, load: _TenantLoad, estimate: DeadlineEstimate, tokens: int) -> None:
        """Refuse a tenant over its share of what fits in time while others are active."""
        active = self._active_tenants
        if active < 2:
            return
        step_s = self.meter.step_s() or 0.0
        answer = self.own_max_tokens / self.own if self.own else float(tokens)
        room_s = max(0.0, estimate.budget_s - estimate.run_s)
        in_time = estimate.slots + room_s * estimate.slots / max(step_s * answer, 1e-9)
        hard_cap = self.ongoing_cap + self.settings.ENGINE_MAX_QUEUED_REQUESTS
        share = max(1, math.ceil(min(in_time, hard_cap) / active))
        if load.in_flight < share:
            return
        excess = load.in_flight + 1 - share
        retry_after = max(1, math.ceil(excess * answer * step_s / estimate.slots))
        raise self._refuse(
            "tenant_share",
            f"this tenant has {load.in_flight} requests in flight on this ingress replica, "
            f"its share while {active} tenants are active and the engines are full is "
            f"{share}; retry in {retry_after} s",
            retry_after,
        )

    def _refuse(self, reason: str, message: str, retry_after_s: int) -> EngineOverloadedError:
        self._refusals.append(self.clock())
        return EngineOverloadedError(
            message,
            status_code=self.settings.OVERLOAD_STATUS_CODE,
            retry_after_s=retry_after_s,
            reason=reason,
        )

    def _release(self, ticket: AdmissionTicket) -> None:
        self.own -= 1
        self.own_max_tokens -= ticket.max_tokens
        if ticket.tenant is not None:
            load = self._tenants.get(ticket.tenant)
            if load is not None:
                load.in_flight -= 1

    def refused_demand(self) -> int:
        """Requests refused here within :data:`DEMAND_WINDOW_S` (demand for the autoscaler)."""
        horizon = self.clock() - DEMAND_WINDOW_S
        return sum(1 for at in self._refusals if at >= horizon)

    def view(self) -> dict[str, Any]:
        """What ``/status/detailed`` shows: the rates and a request's estimate now."""
        meter = self.meter
        probe = self.estimate(self.settings.MAX_TOKENS_CAP) if self.enabled else None

        def rounded(value: float | None, digits: int = 4) -> float | None:
            return None if value is None else round(value, digits)

        return {
            "enabled": self.enabled,
            "stats_age_s": rounded(self.clock() - self.polled_at, 3) if self.polled_at else None,
            "batch_slots": self.slots,
            "engine_requests": self.engine_requests,
            "admitted_in_flight": self.own,
            "seconds_per_token": rounded(meter.seconds_per_token),
            "seconds_per_token_full_batch": rounded(meter.seconds_per_token_full),
            "seconds_per_token_recent": rounded(meter.seconds_per_token_recent),
            "tokens_per_answer": rounded(meter.tokens_per_answer, 1),
            "active_tenants": self._active_tenants,
            "refused_last_10s": self.refused_demand(),
            # A request asking for MAX_TOKENS_CAP tokens, were it to arrive now.
            "estimate_max_tokens_cap": None
            if probe is None
            else {
                "max_tokens": self.settings.MAX_TOKENS_CAP,
                "wait_s": round(probe.wait_s, 3),
                "run_s": round(probe.run_s, 3),
                "budget_s": round(probe.budget_s, 3),
                "ahead": probe.ahead,
                "would_admit": probe.fits,
            },
        }

    def start(self, fleet: Callable[[], Awaitable[EngineFleet]]) -> None:
        """Start polling ``fleet`` in the background (once; needs a running event loop)."""
        if self._task is None and self.enabled:
            self._task = asyncio.get_running_loop().create_task(self.run(fleet))

    async def run(self, fleet: Callable[[], Awaitable[EngineFleet]]) -> None:
        """Poll ``fleet`` every ``ADMISSION_POLL_INTERVAL_S`` until cancelled."""
        while True:
            try:
                self.observe((await fleet()).running_stats)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the last view ages out (STALE_AFTER_S)
                logger.debug("admission: engine stats unavailable: %s", error)
            await asyncio.sleep(self.settings.ADMISSION_POLL_INTERVAL_S)
