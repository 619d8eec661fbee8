"""What the user says each side's keepalive settings are, resolved to numbers.

Three inputs, one result (:func:`build_expectations`):

``--expect NAME=VALUE`` (server side, repeatable)
    Postgres' own GUC names and value syntax (`analysis.gucvalue`).
``--client-dsn CONNINFO`` (client side)
    A libpq connection string, keyword/value or URI form
    (`analysis.conninfo`). Only the keepalive keywords are used.
``--sysctl [server:|client:]net.ipv4.tcp_keepalive_{time,intvl,probes}=N``
    The kernel defaults of each side's network namespace
    (`analysis.kernel_defaults`): what a setting of 0 (or an unset libpq
    parameter) resolves to.

"Anything not given is not judged": a :class:`Setting` whose ``value`` is
None carries no expectation, and the verdicts must not check it.

Pure: no I/O, standard library only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from analysis.conninfo import libpq_int, parse_conninfo
from analysis.gucvalue import parse_expect_items
from analysis.kernel_defaults import C_SPACE, KernelDefaults, parse_sysctls
from analysis.kernel_timer import TimerSettings
from analysis.settings import (
    CLIENT,
    NAMESPACE_DEFAULTS,
    RETRIES2_DEFAULT,
    SERVER,
    SETTINGS,
    USER_TIMEOUT,
    ExpectationError,
)


@dataclass(frozen=True, slots=True)
class Setting:
    """One resolved setting of one side.

    value
        Seconds for idle/interval, a number of probes for count, and
        *seconds* (converted from the milliseconds the user gave) for
        user_timeout, where 0 means "not set: the count rules".  None means
        "not judged".
    given
        What the user wrote, e.g. ``"tcp_keepalives_idle=1min"`` or
        ``"keepalives_idle=30 (client DSN)"``; None when nothing was written.
    source
        Where the value came from, in words: ``"--expect"``, ``"client
        DSN"``, ``"kernel default 7200 s (net.ipv4.tcp_keepalive_time,
        built-in Linux default)"``, ``"kernel default 60 s (--sysctl
        server:net.ipv4.tcp_keepalive_time=60)"``, ``"libpq default (not
        set): ..."``, or ``"not judged: ..."``.
    """

    value: float | int | None
    given: str | None
    source: str

    @property
    def judged(self) -> bool:
        return self.value is not None


@dataclass(frozen=True, slots=True)
class SideExpectation:
    """The expected keepalive behaviour of one endpoint.

    enabled
        True: the side must probe (SO_KEEPALIVE on); False: it must not
        (libpq ``keepalives=0``); None: not judged.
    user_timeout
        In seconds; 0 means "not set" (the count rules), None "not judged".
    enabled_source
        In words, why ``enabled`` is what it is (empty when not judged).
    """

    side: str
    enabled: bool | None
    idle: Setting
    interval: Setting
    count: Setting
    user_timeout: Setting
    enabled_source: str = ""
    retries2: int = RETRIES2_DEFAULT
    """net.ipv4.tcp_retries2 of the side's namespace: what bounds a stall when no user timeout is set."""

    def judged(self) -> bool:
        """Is there anything to judge on this side at all?"""
        return self.enabled is not None or any(
            s.value is not None for s in (self.idle, self.interval, self.count, self.user_timeout)
        )

    def settings(self) -> dict[str, Setting]:
        return {s.key: getattr(self, s.key) for s in SETTINGS}

    def timer_settings(self) -> TimerSettings:
        """The numbers the kernel timer runs on (None where not judged)."""
        count = self.count.value
        return TimerSettings(self.enabled, _seconds(self.idle.value), _seconds(self.interval.value),
                             None if count is None else int(count), _seconds(self.user_timeout.value), self.retries2)


def _seconds(value: float | int | None) -> float | None:
    return None if value is None else float(value)



@dataclass(frozen=True, slots=True)
class Expectations:
    server: SideExpectation
    client: SideExpectation



# --------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------


def _not_judged(reason: str) -> Setting:
    return Setting(None, None, f"not judged: {reason}")


def _unjudged_side(side: str, reason: str) -> SideExpectation:
    s = _not_judged(reason)
    return SideExpectation(side, None, s, s, s, s, "")


def _server_side(expect: Sequence[str], kernel: KernelDefaults) -> SideExpectation:
    given = parse_expect_items(expect)
    if not given:
        return _unjudged_side(SERVER, "no --expect given")
    settings: dict[str, Setting] = {}
    for setting in SETTINGS:
        if setting.guc not in given:
            settings[setting.key] = _not_judged(f"{setting.guc} not given with --expect")
            continue
        item, _, number = given[setting.guc]
        if setting is USER_TIMEOUT:
            source = "--expect" if number else "--expect (0 = not set: the count rules)"
            settings[setting.key] = Setting(setting.seconds(number), item, source)
        elif number == 0:
            field = setting.kernel_field
            settings[setting.key] = Setting(kernel.value(field), item, kernel.describe(field))  # type: ignore[arg-type]
        else:
            settings[setting.key] = Setting(number, item, "--expect")
    return SideExpectation(
        SERVER, True, settings["idle"], settings["interval"], settings["count"], settings["user_timeout"],
        "Postgres turns SO_KEEPALIVE on for every TCP connection", kernel.retries2,
    )


def _client_side(dsn: str, kernel: KernelDefaults) -> SideExpectation:
    params = parse_conninfo(dsn)
    settings: dict[str, Setting] = {}
    keepalives = params.get("keepalives")
    if keepalives is not None and libpq_int("keepalives", keepalives) == 0:
        # libpq skips every keepalive option, and tcp_user_timeout too, when keepalives=0.
        off = f"keepalives={keepalives.strip(C_SPACE)} (client DSN)"
        for setting in NAMESPACE_DEFAULTS:
            value = params.get(setting.libpq)
            settings[setting.key] = Setting(None, None if value is None else f"{setting.libpq}={value} (client DSN)",
                                            f"not judged: {off} turns client keepalives off")
        value = params.get(USER_TIMEOUT.libpq)
        settings[USER_TIMEOUT.key] = Setting(
            0.0, None if value is None else f"{USER_TIMEOUT.libpq}={value} (client DSN)",
            f"not applied: libpq sets tcp_user_timeout only when keepalives are on ({off})")
        return SideExpectation(CLIENT, False, settings["idle"], settings["interval"], settings["count"],
                               settings["user_timeout"], f"{off}: the client must not probe")
    for setting in NAMESPACE_DEFAULTS:
        name, keyword, kernel_field = setting.key, setting.libpq, setting.kernel_field
        assert kernel_field is not None
        value = params.get(keyword)
        if value is None:
            settings[name] = Setting(kernel.value(kernel_field), None,
                                     f"libpq default (not set): {kernel.describe(kernel_field)}")
            continue
        number = libpq_int(keyword, value)
        given = f"{keyword}={value.strip(C_SPACE)} (client DSN)"
        if number <= 0:
            # libpq clamps a negative value to 0.  libpq's docs say 0 is the
            # system default, but libpq hands the 0 to setsockopt(), which
            # Linux refuses (EINVAL), failing the connection attempt; other
            # client OSes take it as the default.
            settings[name] = Setting(
                kernel.value(kernel_field), given,
                f"{kernel.describe(kernel_field)}; caution: a Linux client's libpq fails to connect with "
                f"{keyword}=0 (setsockopt {setting.sockopt} EINVAL)")
            continue
        if number > setting.high:
            raise ExpectationError(
                f"--client-dsn: {keyword}={number} is out of range (1..{setting.high} on Linux, "
                f"0 = kernel default): libpq's setsockopt({setting.sockopt}) would fail")
        settings[name] = Setting(number, given, "client DSN")
    value = params.get(USER_TIMEOUT.libpq)
    if value is None:
        settings[USER_TIMEOUT.key] = Setting(0.0, None, "libpq default (not set): no user timeout, the count rules")
    else:
        number = max(0, libpq_int(USER_TIMEOUT.libpq, value))  # libpq clamps negatives to 0
        given = f"{USER_TIMEOUT.libpq}={value.strip(C_SPACE)} (client DSN)"
        settings[USER_TIMEOUT.key] = Setting(
            USER_TIMEOUT.seconds(number), given, "client DSN" if number else "client DSN (0 = not set: the count rules)")
    enabled_source = ("libpq default keepalives=1" if keepalives is None
                      else f"keepalives={keepalives.strip(C_SPACE)} (client DSN)")
    return SideExpectation(CLIENT, True, settings["idle"], settings["interval"], settings["count"],
                           settings["user_timeout"], enabled_source, kernel.retries2)


def build_expectations(
    expect: Sequence[str] = (), client_dsn: str | None = None, sysctls: Sequence[str] = ()
) -> Expectations:
    """Resolve the user's --expect, --client-dsn and --sysctl into per-side expectations.

    Kernel defaults come from :func:`parse_sysctls` (per side; 7200/75/9
    when not given).

    Server side: with no --expect at all it is not judged (enabled None, all
    settings None).  With any --expect, enabled is True (Postgres sets
    SO_KEEPALIVE on every TCP connection); each GUC given is resolved, 0
    meaning the server namespace's kernel default (Postgres reads it back at
    connection start) with a source that says so; tcp_user_timeout=0 stays 0
    ("not set").  A GUC not given is None: not judged, even if a related one
    is.

    Client side: not judged without a DSN (None; an empty string is a DSN,
    all defaults).  With ``keepalives=0`` enabled is False and nothing else
    is judged (libpq then sets no keepalive option and no tcp_user_timeout,
    so user_timeout is 0).  Otherwise enabled is True and each of
    keepalives_idle/interval/count resolves to the client namespace's kernel
    default when unset ("libpq default") or 0 (negative counts as 0, as
    libpq clamps it; the source carries a caution, because libpq passes the
    0 to setsockopt() and Linux refuses it); tcp_user_timeout unset or 0 is 0.
    Values must be integers as libpq parses them, and within the Linux range.
    """
    server_kernel, client_kernel = parse_sysctls(sysctls or ())
    server = _server_side(expect or (), server_kernel)
    if client_dsn is None:
        client = _unjudged_side(CLIENT, "no --client-dsn given")
    else:
        client = _client_side(client_dsn, client_kernel)
    return Expectations(server, client)