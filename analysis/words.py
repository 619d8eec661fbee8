"""How kaobs writes times and durations, once for every report, note and alarm.

Reports of a capture give UTC (a capture from another machine has no local
time here); what someone watching live compares with a wall clock is local
time.
"""
from __future__ import annotations

import datetime as _dt


def utc_clock(t: float | None, millis: bool = True, missing: str = "?") -> str:
    """``14:02:07.123`` (UTC) for a Unix time; `missing` for None."""
    return _clock(t, _dt.timezone.utc, millis, missing)


def local_clock(t: float | None, millis: bool = True, missing: str = "-") -> str:
    """``15:02:07.123`` in this machine's time zone, for what a person watching live compares with."""
    return _clock(t, None, millis, missing)


def _clock(t: float | None, zone: _dt.tzinfo | None, millis: bool, missing: str) -> str:
    if t is None:
        return missing
    try:
        text = _dt.datetime.fromtimestamp(t, zone).strftime("%H:%M:%S.%f")
    except (OverflowError, OSError, ValueError):
        # A damaged or hand-made capture can hold a time past year 9999 (or before 1 AD):
        # no clock reads that, so say the number rather than fail the whole report.
        return f"t={t:.6g}"
    return text[:-3] if millis else text[:-7]


def age(seconds: float) -> str:
    """A duration for notes: ``4.2 s``, ``12 min``, ``3.1 h``."""
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.1f} s"
