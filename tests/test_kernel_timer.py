"""The kernel's keepalive timer (analysis/kernel_timer.py) against docs/kernel-keepalive.md and a brute-force replay."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.kernel_timer import (
    ABORT,
    BLOCKED,
    BY_COUNT,
    BY_USER_TIMEOUT,
    PROBE,
    UNKNOWN,
    TimerEvent,
    TimerSettings,
    TimerState,
    abort_due,
    abort_rule,
    decide,
    keepalive_blocked,
    next_event,
)

SEED = TimerSettings(True, 3.0, 2.0, 3, 0.0)


def test_first_probe_comes_idle_after_the_last_accepted_packet():
    assert next_event(TimerState(10.0), SEED) == TimerEvent(PROBE, 13.0, None)


def test_seed_aborts_one_interval_after_the_count_th_unanswered_probe():
    # seed capture: last answer at 6.075, probes 9.082, 11.098, 13.114, RST 15.130
    assert abort_due(TimerState(6.075), SEED) == pytest.approx(6.075 + 3 + 3 * 2)
    state = TimerState(6.075, 3, 13.114 + 2)
    event = next_event(state, SEED)
    assert event.kind == ABORT and event.due == pytest.approx(15.114) and event.rule == BY_COUNT


def test_after_an_answered_probe_the_armed_interval_still_counts():
    # probe at 3.0 answered at 3.0005: the timer armed for probe + interval still runs
    state = TimerState(3.0005, 0, 3.0 + 2.0)
    assert next_event(state, SEED).due == pytest.approx(6.0005)  # answer + idle is later
    slow = TimerSettings(True, 1.0, 5.0, 3, 0.0)
    assert next_event(TimerState(3.0005, 0, 8.0), slow).due == pytest.approx(8.0)  # probe + interval is later


def test_user_timeout_replaces_the_count():
    # user_timeout_4000_idle1_int1_cnt10.pcap: three unanswered probes, not ten, RST ~4.1 s after the last accepted
    timers = TimerSettings(True, 1.0, 1.0, 10, 4.0)
    assert abort_due(TimerState(0.0), timers) == pytest.approx(4.0)
    assert abort_due(TimerState(0.0), TimerSettings(True, 1.0, 1.0, 10, 0.0)) == pytest.approx(11.0)
    # the user timeout needs a probe out: with none, the first tick probes even past it
    assert decide(TimerState(0.0, 0), TimerSettings(True, 5.0, 1.0, 10, 2.0), 5.0).kind == PROBE
    assert decide(TimerState(0.0, 1), TimerSettings(True, 5.0, 1.0, 10, 2.0), 6.0).rule == BY_USER_TIMEOUT


def test_data_in_flight_blocks_keepalive():
    assert keepalive_blocked(True, False) and keepalive_blocked(False, True) and not keepalive_blocked(False, False)
    assert next_event(TimerState(0.0, data_in_flight=True), SEED).kind == BLOCKED
    assert decide(TimerState(0.0, data_in_flight=True), SEED, 10.0).kind == BLOCKED


def test_probes_zero_aborts_at_the_first_tick_without_a_probe():
    event = next_event(TimerState(0.0), TimerSettings(True, 2.0, 1.0, 0, 0.0))
    assert event.kind == ABORT and event.due == 2.0


def test_what_the_settings_do_not_say_cannot_be_predicted():
    assert next_event(TimerState(0.0), TimerSettings()).kind == UNKNOWN
    assert next_event(TimerState(None), SEED).kind == UNKNOWN
    assert next_event(TimerState(0.0), TimerSettings(False, 3.0, 2.0, 3, 0.0)).kind == UNKNOWN
    assert abort_due(TimerState(None, 1, 5.0), TimerSettings(True, 1.0, 1.0, 10, 4.0)) is None  # user timeout, anchor unknown
    assert abort_due(TimerState(None, 1, 5.0), SEED) == pytest.approx(5.0 + 2 * 2.0)  # the count needs no anchor


def test_slack_moves_only_the_user_timeout_boundary():
    timers = TimerSettings(True, 1.0, 1.0, 10, 4.0)
    assert abort_rule(timers, 2, 3.995) is None
    assert abort_rule(timers, 2, 3.995, slack=-0.010) == BY_USER_TIMEOUT
    assert abort_rule(timers, 2, 4.0, slack=0.010) is None
    assert abort_rule(SEED, 3, 0.0, slack=5.0) == BY_COUNT


def brute_force_abort(last: float, settings: TimerSettings) -> float:
    """tcp_keepalive_timer ticked by hand, nothing answering: the reference for abort_due."""
    t, out = last + settings.idle, 0
    for _ in range(100_000):
        elapsed = t - last
        if settings.user_timeout:
            if out > 0 and elapsed >= settings.user_timeout:
                return t
        elif out >= settings.count:
            return t
        out += 1
        t += settings.interval
    raise AssertionError("no abort")


@settings(max_examples=400, deadline=None, derandomize=True)
@given(idle=st.integers(1, 7200), interval=st.integers(1, 300), count=st.integers(0, 127),
       user_timeout_ms=st.sampled_from([0, 0, 1, 999, 1000, 4000, 60_000, 600_000]) | st.integers(0, 10**7),
       last=st.floats(0, 1e9, allow_nan=False))
def test_abort_due_equals_the_kernel_ticked_by_hand(idle, interval, count, user_timeout_ms, last):
    timers = TimerSettings(True, float(idle), float(interval), count, user_timeout_ms / 1000)
    assert abort_due(TimerState(last), timers) == pytest.approx(brute_force_abort(last, timers), rel=1e-12, abs=1e-6)
