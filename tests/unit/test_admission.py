"""The deadline admission's estimate and fair share, on a clock and stats of our making."""

from __future__ import annotations

import math

import pytest

from cloudllm_serve.errors import EngineOverloadedError
from cloudllm_serve.ingress.admission import DeadlineAdmission, ThroughputMeter
from cloudllm_serve.settings import Settings
from tests.fakes import engine_stats

SLOTS = 4
STEP_S = 0.1  # seconds per decode step of a full batch
ANSWER = 20  # tokens per answer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def busy_engine(admission: DeadlineAdmission, clock: Clock, *, waiting: int = 0) -> None:
    """Five polls, 1 s apart, of one replica with a full batch at STEP_S per token."""
    tokens = finished = 0
    for _ in range(5):
        admission.observe(
            [
                engine_stats(
                    replica_id="r1",
                    max_num_seqs=SLOTS,
                    running_requests=SLOTS,
                    pending_requests=waiting,
                    tokens_generated=tokens,
                    requests_finished=finished,
                )
            ]
        )
        clock.now += 1.0
        tokens += round(SLOTS / STEP_S)  # SLOTS tokens per step
        finished += round(SLOTS / STEP_S / ANSWER)
    clock.now -= 1.0  # the last poll is "now"


def admission(timeout_s: float = 10.0, **settings: object) -> tuple[DeadlineAdmission, Clock]:
    clock = Clock()
    config = Settings(REQUEST_TIMEOUT_S=timeout_s, **settings)  # type: ignore[arg-type]
    return DeadlineAdmission(config, clock=clock), clock


def test_the_meter_measures_a_step_and_an_answer() -> None:
    subject, clock = admission()
    busy_engine(subject, clock)
    assert subject.meter.seconds_per_token_full == pytest.approx(STEP_S)
    assert subject.meter.tokens_per_answer == pytest.approx(ANSWER)


def test_without_stats_everything_is_admitted() -> None:
    subject, _ = admission(timeout_s=0.001)
    assert subject.estimate(1000) is None
    tickets = [subject.admit(None, 1000) for _ in range(50)]
    assert subject.own == 50
    for ticket in tickets:
        ticket.release()
        ticket.release()  # idempotent
    assert subject.own == 0 and subject.own_max_tokens == 0


def test_stale_stats_count_as_none() -> None:
    subject, clock = admission()
    busy_engine(subject, clock, waiting=100)
    assert subject.estimate(10) is not None
    clock.now += 11
    assert subject.estimate(10) is None


def test_a_free_slot_admits_at_once_and_a_backlog_waits_its_drain() -> None:
    subject, clock = admission(timeout_s=100.0)
    busy_engine(subject, clock, waiting=SLOTS)  # 4 running half done, 4 waiting whole
    estimate = subject.estimate(10)
    assert estimate is not None and not estimate.starts_at_once
    work = SLOTS * ANSWER / 2 + SLOTS * ANSWER
    assert estimate.wait_s == pytest.approx(work * STEP_S / SLOTS)
    assert estimate.run_s == pytest.approx(10 * STEP_S)
    # This replica's own queued requests count at their max_tokens.
    subject.admit(None, 50)
    later = subject.estimate(10)
    assert later is not None and later.ahead == 2 * SLOTS + 1
    assert later.wait_s == pytest.approx((work + 50) * STEP_S / SLOTS)


def test_a_request_that_would_miss_the_deadline_is_refused_with_a_retry_after() -> None:
    subject, clock = admission(timeout_s=10.0)
    busy_engine(subject, clock, waiting=40)  # 4 x 10 + 40 x 20 tokens: 21 s of waiting
    estimate = subject.estimate(20)
    assert estimate is not None and not estimate.fits
    with pytest.raises(EngineOverloadedError) as refused:
        subject.admit(None, 20)
    error = refused.value
    assert error.reason == "deadline" and error.status_code == 503
    assert error.retry_after_s == math.ceil(estimate.total_s - estimate.budget_s)
    assert "REQUEST_TIMEOUT_S (10 s)" in error.message and "max_tokens=20" in error.message
    assert subject.own == 0 and subject.refused_demand() == 1


def test_admitted_requests_are_counted_until_the_next_no_longer_fits() -> None:
    """Each admission adds to the work ahead of the next: admitted ones stay in time."""
    subject, clock = admission(timeout_s=20.0, OVERLOAD_STATUS_CODE=429)
    busy_engine(subject, clock)
    admitted = 0
    with pytest.raises(EngineOverloadedError) as refused:
        for _ in range(1000):
            subject.admit(None, ANSWER)
            admitted += 1
    assert refused.value.status_code == 429
    # Budget 18.5 s; each request ahead adds ANSWER x STEP_S / SLOTS = 0.5 s of waiting.
    assert 30 <= admitted <= 40
    last = subject.estimate(ANSWER)
    assert last is not None and last.total_s > last.budget_s


def test_a_request_never_fitting_still_runs_when_a_slot_is_free() -> None:
    subject, clock = admission(timeout_s=10.0)
    busy_engine(subject, clock)
    subject.observe(
        [
            engine_stats(
                replica_id="r1",
                max_num_seqs=SLOTS,
                running_requests=1,
                tokens_generated=10_000,
                requests_finished=100,
            )
        ]
    )
    subject.admit(None, 10_000)  # 1000 s of decoding, but nothing to wait for


def test_a_flooding_tenant_is_held_to_its_share_once_another_asks() -> None:
    subject, clock = admission(timeout_s=60.0)
    busy_engine(subject, clock)
    flood = []
    with pytest.raises(EngineOverloadedError) as refused:
        for _ in range(1000):
            flood.append(subject.admit("a", ANSWER))
    assert refused.value.reason == "deadline"
    # Tenant b asks: refused by the deadline, as a's flood fills it, but now active.
    with pytest.raises(EngineOverloadedError):
        subject.admit("b", ANSWER)
    # a's earlier requests finish; a's new ones are held to half.
    for ticket in flood[: len(flood) // 3]:
        ticket.release()
    with pytest.raises(EngineOverloadedError) as over_share:
        subject.admit("a", ANSWER)
    assert over_share.value.reason == "tenant_share" and over_share.value.retry_after_s >= 1
    assert "share while 2 tenants are active" in over_share.value.message
    subject.admit("b", ANSWER)  # the room a left goes to b


def test_one_tenant_alone_may_use_all_of_it() -> None:
    subject, clock = admission(timeout_s=60.0)
    busy_engine(subject, clock)
    with pytest.raises(EngineOverloadedError) as refused:
        for _ in range(1000):
            subject.admit("a", ANSWER)
    assert refused.value.reason == "deadline"


def test_a_restarted_replica_does_not_make_negative_rates() -> None:
    meter = ThroughputMeter()
    meter.observe([engine_stats(replica_id="r", running_requests=4, tokens_generated=500)], 0.0)
    meter.observe([engine_stats(replica_id="r", running_requests=4, tokens_generated=10)], 1.0)
    assert meter.seconds_per_token is None
    meter.observe([engine_stats(replica_id="r", running_requests=4, tokens_generated=50)], 2.0)
    assert meter.seconds_per_token == pytest.approx(4 / 40)


def test_a_slowdown_counts_at_once_and_a_lull_does_not_hide_the_full_batch() -> None:
    meter = ThroughputMeter(window_s=10.0, recent_s=2.0)
    tokens = 0
    for second in range(8):  # full batch of 4: 40 tokens/s (0.1 s/token), then 20 (0.2)
        meter.observe(
            [engine_stats(max_num_seqs=4, running_requests=4, tokens_generated=tokens)], second
        )
        tokens += 40 if second < 5 else 20
    assert meter.seconds_per_token_full is not None and meter.seconds_per_token_full < 0.15
    assert meter.step_s() == pytest.approx(0.2)  # the last 2 s, not the window's mean
    for second in range(8, 11):  # one sequence now, at 0.1 s/token: the full batch rules
        meter.observe(
            [engine_stats(max_num_seqs=4, running_requests=1, tokens_generated=tokens)], second
        )
        tokens += 10
    assert meter.step_s() == pytest.approx(meter.seconds_per_token_full)
