"""The worker's liveness, backoff and drain, driven with a fake clock: no socket, no sleep."""

from __future__ import annotations

import pytest

from worker.liveness import MAX_BACKOFF_HEARTBEATS, MAX_POLL_S, REPORT_START_S, Liveness


@pytest.fixture
def live():
    return Liveness(heartbeat_s=1.0, liveness=3, drain_s=5.0, now=100.0)


def test_a_heartbeat_is_due_only_after_a_heartbeat_interval_without_sending(live):
    assert not live.heartbeat_due(100.9)
    assert live.heartbeat_due(101.0)
    live.sent(101.0)
    assert not live.heartbeat_due(101.5)


def test_the_broker_counts_as_gone_after_heartbeat_times_liveness_unheard(live):
    assert not live.broker_silent(102.9)
    live.heard(102.9)
    assert not live.broker_silent(105.8)
    assert live.broker_silent(105.9)


def test_backoff_doubles_with_each_fresh_socket_up_to_its_cap_and_resets_when_heard(live):
    waits = []
    now = 100.0
    for _ in range(6):
        now += live.silence_s
        assert live.broker_silent(now)
        backoff = live.backoff_s
        live.redialled(now)
        # silent again only once the longer of the backoff and the silence has passed
        waits.append(max(backoff, live.silence_s))
        assert not live.broker_silent(now + max(backoff, live.silence_s) - 0.01)
        assert live.broker_silent(now + max(backoff, live.silence_s))
        now += max(backoff, live.silence_s) - live.silence_s
    assert live.backoff_s == MAX_BACKOFF_HEARTBEATS * live.heartbeat_s
    assert waits == [3.0, 3.0, 4.0, 8.0, 8.0, 8.0]
    live.heard(now)
    assert live.backoff_s == live.heartbeat_s


def test_a_drain_starts_once_and_is_over_after_drain_seconds(live):
    assert not live.drain_over(1e9)
    assert live.start_drain(100.0)
    assert not live.start_drain(101.0)  # a second stop request does not move the deadline
    assert not live.drain_over(104.9)
    assert live.drain_over(105.0)


def test_the_poll_waits_for_the_nearest_deadline_shorter_while_output_waits(live):
    assert live.wait_s(100.0, output_pending=False) == MAX_POLL_S
    assert live.wait_s(100.9, output_pending=False) == pytest.approx(0.1)
    assert live.wait_s(100.0, output_pending=True) == REPORT_START_S
    assert live.wait_s(200.0, output_pending=False) == 0.0


def test_a_done_is_confirmed_by_anything_heard_two_heartbeats_after_it_was_sent(live):
    live.heard(101.9)
    assert not live.confirmed(sent_at=100.0)
    live.heard(102.0)
    assert live.confirmed(sent_at=100.0)
