"""The keepalive settings, written out once: every name, unit, range and default they go by.

A side's keepalive timer runs on four numbers (idle, interval, count, user
timeout) and one switch (SO_KEEPALIVE). Each number is known under several
names: the Postgres server GUC, libpq's keyword on the client, the socket
option both hand it to, and, for the first three, the sysctl that is the
default of the network namespace when the setting is 0 or unset. Every
module that needs one of these names or limits takes it from `SETTINGS`
instead of writing its own table.

A `KeepaliveSetting` also knows how its values read (`text`), in the units
the reports use: seconds for idle and interval, a probe count, milliseconds
for the user timeout (whose value inside kaobs is in seconds, as the
kernel's other timers are).
"""
from __future__ import annotations

from dataclasses import dataclass

SERVER = "server"
CLIENT = "client"
SIDES = (SERVER, CLIENT)

INT_MAX = 2**31 - 1
INT_MIN = -(2**31)


@dataclass(frozen=True, slots=True)
class KeepaliveSetting:
    """One number of a keepalive timer, under all its names.

    `key` is kaobs's own name (the field of an expectation and of the
    kernel timer's settings). `unit` is the base unit of the GUC and of the
    libpq keyword: "s", "ms", or None for a plain count. `high` is the
    largest value Linux takes in setsockopt (include/net/tcp.h; larger is
    EINVAL); `guc_high` what the GUC itself accepts. `sysctl` is the
    namespace default a 0 resolves to (None for the user timeout, where 0
    means "not set"), `kernel_field` its short name in `KernelDefaults`,
    `sysctl_low`/`sysctl_high` the values the sysctl accepts.
    """

    key: str
    guc: str
    libpq: str
    sockopt: str
    unit: str | None
    guc_high: int
    high: int
    sysctl: str | None
    linux_default: int | None
    sysctl_low: int = 1
    sysctl_high: int = INT_MAX

    @property
    def kernel_field(self) -> str | None:
        """``keepalive_time`` for ``net.ipv4.tcp_keepalive_time``: the `KernelDefaults` field."""
        return None if self.sysctl is None else self.sysctl.removeprefix("net.ipv4.tcp_")

    @property
    def proc_path(self) -> str | None:
        """Where the namespace default is read: ``/proc/sys/net/ipv4/tcp_keepalive_time``."""
        return None if self.sysctl is None else "/proc/sys/" + self.sysctl.replace(".", "/")

    @property
    def guc_range(self) -> str:
        """The values the server GUC takes, in words, for error messages."""
        if self.sysctl is None:
            return f"0 = not set, or 1..{self.guc_high} {self.unit}"
        unit = f" {self.unit}" if self.unit else ""
        return f"0 = kernel default, or 1..{self.guc_high}{unit} (the Linux limit)"

    def name(self, side: str) -> str:
        """What the user calls it on that side: the server GUC or the client's libpq keyword."""
        return self.guc if side == SERVER else self.libpq

    def seconds(self, base_value: int) -> float | int:
        """A GUC or libpq value in its base unit, as kaobs holds it: seconds (or probes)."""
        return base_value / 1000 if self.unit == "ms" else base_value

    def text(self, value: float | int) -> str:
        """An expected value as the reports write it: ``3 s``, ``9``, ``4000 ms``, ``0 (off)``."""
        if self.unit is None:
            return f"{value}"
        if self.unit == "ms":
            return "0 (off)" if not value else f"{float(value) * 1000:.0f} ms"
        return f"{float(value):g} s"

    def observed_text(self, value: float | int) -> str:
        """An observed value as the reports write it: ``3.004 s``, ``3``, ``4012 ms to abort``."""
        if self.unit is None:
            return f"{value}"
        if self.unit == "ms":
            return f"{value * 1000:.0f} ms to abort"
        return f"{value:.3f} s"


MAX_TCP_KEEPIDLE = 32767
MAX_TCP_KEEPINTVL = 32767
MAX_TCP_KEEPCNT = 127

IDLE = KeepaliveSetting("idle", "tcp_keepalives_idle", "keepalives_idle", "TCP_KEEPIDLE", "s",
                        MAX_TCP_KEEPIDLE, MAX_TCP_KEEPIDLE, "net.ipv4.tcp_keepalive_time", 7200)
INTERVAL = KeepaliveSetting("interval", "tcp_keepalives_interval", "keepalives_interval", "TCP_KEEPINTVL", "s",
                            MAX_TCP_KEEPINTVL, MAX_TCP_KEEPINTVL, "net.ipv4.tcp_keepalive_intvl", 75)
COUNT = KeepaliveSetting("count", "tcp_keepalives_count", "keepalives_count", "TCP_KEEPCNT", None,
                         MAX_TCP_KEEPCNT, MAX_TCP_KEEPCNT, "net.ipv4.tcp_keepalive_probes", 9,
                         sysctl_low=0, sysctl_high=255)  # a u8 in the kernel
USER_TIMEOUT = KeepaliveSetting("user_timeout", "tcp_user_timeout", "tcp_user_timeout", "TCP_USER_TIMEOUT", "ms",
                                INT_MAX, INT_MAX, None, None)

SETTINGS: tuple[KeepaliveSetting, ...] = (IDLE, INTERVAL, COUNT, USER_TIMEOUT)
"""The four numbers, in the order the reports list them."""
BY_KEY = {s.key: s for s in SETTINGS}
BY_GUC = {s.guc: s for s in SETTINGS}
BY_LIBPQ = {s.libpq: s for s in SETTINGS}
BY_SYSCTL = {s.sysctl: s for s in SETTINGS if s.sysctl is not None}
NAMESPACE_DEFAULTS: tuple[KeepaliveSetting, ...] = tuple(s for s in SETTINGS if s.sysctl is not None)
"""The settings a 0 resolves to a namespace default for: idle, interval, count."""

GUC_NAMES: tuple[str, ...] = tuple(s.guc for s in SETTINGS)

RETRIES2_SYSCTL = "net.ipv4.tcp_retries2"
RETRIES2_DEFAULT = 15
RETRIES2_RANGE = (0, 255)
"""The namespace's bound on retransmissions when no tcp_user_timeout is set (~924.6 s for 15):
not a keepalive setting, but what ends a connection whose data is in flight."""
SYSCTL_NAMES: tuple[str, ...] = (*(s.sysctl for s in NAMESPACE_DEFAULTS), RETRIES2_SYSCTL)  # type: ignore[misc]
"""The sysctls of a network namespace kaobs reads and lets the user state (--sysctl)."""

ENABLED_KEY = "enabled"
"""The switch: SO_KEEPALIVE. Postgres turns it on for every TCP session; libpq's ``keepalives`` on the client."""
ENABLED_LIBPQ = "keepalives"
LIBPQ_KEYWORDS: tuple[str, ...] = (ENABLED_LIBPQ, *(s.libpq for s in SETTINGS))
"""The client's keepalive keywords, the switch first."""


def setting_name(key: str, side: str) -> str:
    """The user's name for a setting key on a side; the switch is ``keepalives`` on both."""
    return ENABLED_LIBPQ if key == ENABLED_KEY else BY_KEY[key].name(side)


class ExpectationError(ValueError):
    """A user-facing, one-line message about a bad --expect/--client-dsn/--sysctl.

    Messages about a DSN never contain the password (or any other value of
    a secret keyword), nor a word of the DSN that is not a known keyword.
    """
