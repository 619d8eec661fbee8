"""How late or early a Linux TCP timer may fire, as the verdicts must allow.

The kernel's timer wheel files a timeout into a level whose granularity grows
with the timeout's length, and rounds the expiry *up* to that granularity: a
keepalive fires late by up to ~1/8 of its length, never early (the capture
clock and the prober's clock can disagree by a tick). A tolerance that is a
fixed number of milliseconds is wrong for both a 1 s interval and a 7200 s
idle, so every comparison asks this module and reports which bound it used.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

DEFAULT_HZ = 250
WHEEL_LEVELS = 9
LEVEL_BITS = 6
LEVEL_CLK_SHIFT = 3
# Capture timestamps and the prober's jiffies are different clocks; one tick of
# the coarsest common HZ (100) covers the disagreement seen here (< 5 ms).
EARLY_TOLERANCE_S = 0.010
# Softirq and capture latency on top of the wheel's rounding, seen here up to
# 9 ms on a loaded 2-core machine.
PROCESSING_SLACK_S = 0.015


@dataclass(frozen=True, slots=True)
class Tolerance:
    """The window [expected - early, expected + late] an observed timer may land in."""

    early: float
    late: float
    basis: str

    def admits(self, expected: float, observed: float) -> bool:
        return expected - self.early <= observed <= expected + self.late


def wheel_granularity(timeout_s: float, hz: int = DEFAULT_HZ) -> float:
    """Granularity in seconds of the wheel level a timeout of this length lands in.

    Level n holds timeouts up to 64 * 8**n ticks (less the bits shared with
    the next level) and rounds them to 8**n ticks; see kernel/time/timer.c.
    """
    ticks = max(0.0, timeout_s) * hz
    for level in range(WHEEL_LEVELS):
        granularity_ticks = 1 << (level * LEVEL_CLK_SHIFT)
        level_end_ticks = (1 << LEVEL_BITS) * granularity_ticks
        if ticks < level_end_ticks:
            return granularity_ticks / hz
    return (1 << ((WHEEL_LEVELS - 1) * LEVEL_CLK_SHIFT)) / hz


@lru_cache(maxsize=1024)
def timer_tolerance(timeout_s: float, hz: int = DEFAULT_HZ) -> Tolerance:
    """Tolerance for one timer of `timeout_s` seconds, with the reason in words (cached: the live view asks
    for the same few timers thousands of times a second)."""
    granularity = wheel_granularity(timeout_s, hz)
    late = granularity + PROCESSING_SLACK_S
    basis = (
        f"allowed -{_ms(EARLY_TOLERANCE_S)}/+{_ms(late)} ({timeout_s:g} s timer: wheel granularity "
        f"{_ms(granularity)} at HZ={hz}, +{_ms(PROCESSING_SLACK_S)} slack)"
    )
    return Tolerance(early=EARLY_TOLERANCE_S, late=late, basis=basis)


def _ms(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:g} s"
    return f"{seconds * 1000:.0f} ms"
