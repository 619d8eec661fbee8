"""The keepalive sysctls of a network namespace, and ``--sysctl`` that states them.

A keepalive setting of 0 (or an unset libpq keyword) runs the default of the
prober's network namespace: ``net.ipv4.tcp_keepalive_time``, ``_intvl`` and
``_probes`` (IPv6 TCP uses them too). Each container has its own namespace,
and a new one starts at the built-in 7200/75/9 whatever the host says, so the
server's and the client's defaults are kept apart.

Pure: no I/O; reading them from a namespace is `kaobs.postgres`'s and the
lab's job.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Sequence

from analysis.settings import (
    COUNT,
    IDLE,
    INTERVAL,
    NAMESPACE_DEFAULTS,
    RETRIES2_DEFAULT,
    RETRIES2_RANGE,
    RETRIES2_SYSCTL,
    SIDES,
    ExpectationError,
)

C_SPACE = " \t\n\v\f\r"
"""isspace() in the C locale: what Postgres and libpq strip around words."""


def unquote(text: str) -> str:
    """Strip C whitespace and one pair of matching single or double quotes."""
    text = text.strip(C_SPACE)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


@dataclass(frozen=True, slots=True)
class KernelDefaults:
    """The keepalive sysctls of one network namespace (net.ipv4.*; IPv6 TCP uses them too).

    Fields are named after the sysctls (``keepalive_time`` for
    ``net.ipv4.tcp_keepalive_time``: `KeepaliveSetting.kernel_field`).
    ``origins`` holds, per field name, the ``--sysctl`` item (as written)
    that set it; fields not in it are the built-in Linux defaults.
    """

    keepalive_time: int = IDLE.linux_default  # type: ignore[assignment]
    keepalive_intvl: int = INTERVAL.linux_default  # type: ignore[assignment]
    keepalive_probes: int = COUNT.linux_default  # type: ignore[assignment]
    retries2: int = RETRIES2_DEFAULT
    source: str = "built-in Linux defaults"
    origins: tuple[tuple[str, str], ...] = ()

    def value(self, field_name: str) -> int:
        """The namespace default of one field (``keepalive_time``, ...)."""
        return getattr(self, field_name)

    def origin(self, name: str) -> str | None:
        """The --sysctl item that set field `name`, or None for the built-in default."""
        for key, text in self.origins:
            if key == name:
                return text
        return None

    def describe(self, name: str) -> str:
        """``"kernel default 7200 s (net.ipv4.tcp_keepalive_time, built-in Linux default)"`` and the like."""
        value = self.value(name)
        sysctl = _BY_FIELD[name].sysctl
        amount = f"{value} probes" if name == COUNT.kernel_field else f"{value} s"
        origin = self.origin(name)
        if origin is None:
            return f"kernel default {amount} ({sysctl}, built-in Linux default)"
        return f"kernel default {amount} (--sysctl {origin})"


_BY_FIELD = {s.kernel_field: s for s in NAMESPACE_DEFAULTS}
# short sysctl name -> (KernelDefaults field, lowest, highest value accepted)
_BY_SHORT_NAME: dict[str, tuple[str, int, int]] = {
    **{s.sysctl.removeprefix("net.ipv4."): (s.kernel_field, s.sysctl_low, s.sysctl_high)  # type: ignore[union-attr]
       for s in NAMESPACE_DEFAULTS},
    RETRIES2_SYSCTL.removeprefix("net.ipv4."): ("retries2", *RETRIES2_RANGE),
}


def sysctl_short_name(name: str) -> str:
    """``net.ipv4.tcp_keepalive_time``, ``net/ipv4/...``, ``/proc/sys/net/ipv4/...`` -> ``tcp_keepalive_time``."""
    name = name.strip(C_SPACE).replace("/", ".")
    name = name.removeprefix(".proc.sys.")
    return name.removeprefix("net.ipv4.")


def parse_sysctls(items: Sequence[str]) -> tuple[KernelDefaults, KernelDefaults]:
    """Parse ``--sysctl`` items into the (server, client) namespaces' kernel defaults.

    Forms: ``net.ipv4.tcp_keepalive_time=N``, the ``/proc/sys`` slash form
    ``net/ipv4/tcp_keepalive_time=N``, or the bare ``tcp_keepalive_time=N``;
    likewise ``tcp_keepalive_intvl`` and ``tcp_keepalive_probes``.  Without a
    prefix the value applies to both sides; ``server:`` or ``client:`` limits
    it to that side's namespace (a container's can differ from the host's)
    and wins over an unprefixed item whatever the order.  Values are plain
    decimal integers: time and intvl in seconds, at least 1; probes 0..255.
    ``net.ipv4.tcp_retries2`` (0..255, default 15) is accepted too: it bounds
    a stall with data in flight when no tcp_user_timeout is set.
    The same name for the same side twice with different values is an
    error.  Sides not mentioned keep the built-in Linux defaults 7200/75/9.
    """
    if isinstance(items, str):
        items = [items]
    # (scope, field) -> (value, item as written); scope "" = both sides
    given: dict[tuple[str, str], tuple[int, str]] = {}
    for raw in items:
        item = raw.strip(C_SPACE)
        scope = ""
        body = item
        head, colon, tail = item.partition(":")
        if colon and "=" not in head and "." not in head and "/" not in head:
            scope = head.strip(C_SPACE).lower()
            if scope not in SIDES:
                raise ExpectationError(f"--sysctl {item}: unknown side {head!r} (use server: or client:, or no prefix for both)")
            body = tail
        name, sep, value = body.partition("=")
        if not sep:
            raise ExpectationError(f"--sysctl {item}: expected [server:|client:]NAME=N, e.g. net.ipv4.tcp_keepalive_time=600")
        short = sysctl_short_name(name.lower())
        known = _BY_SHORT_NAME.get(short)
        if known is None:
            valid = ", ".join(f"net.ipv4.{n}" for n in _BY_SHORT_NAME)
            close = difflib.get_close_matches(short.split(".")[-1], list(_BY_SHORT_NAME), n=1, cutoff=0.6)
            hint = f"; did you mean net.ipv4.{close[0]}?" if close else ""
            raise ExpectationError(f"--sysctl {item}: unknown sysctl {name.strip(C_SPACE)!r}{hint} (valid: {valid})")
        field_name, low, high = known
        text = unquote(value)
        if not re.fullmatch(r"[0-9]+", text):
            raise ExpectationError(f"--sysctl {item}: the value must be a whole number")
        number = int(text)
        if not low <= number <= high:
            raise ExpectationError(f"--sysctl {item}: out of range ({low}..{high})")
        key = (scope, field_name)
        if key in given and given[key][0] != number:
            raise ExpectationError(f"--sysctl net.ipv4.{short} given twice for the same side: {given[key][1]!r} and {item!r}")
        given.setdefault(key, (number, item))

    def side_defaults(side: str) -> KernelDefaults:
        values: dict[str, int] = {}
        origins: list[tuple[str, str]] = []
        for field_name, _, _ in _BY_SHORT_NAME.values():
            chosen = given.get((side, field_name)) or given.get(("", field_name))
            if chosen is not None:
                values[field_name] = chosen[0]
                origins.append((field_name, chosen[1]))
        if not origins:
            return KernelDefaults()
        source = "; ".join(f"--sysctl {text}" for _, text in origins)
        if len(origins) < len(_BY_SHORT_NAME):
            source += "; built-in Linux defaults for the rest"
        return KernelDefaults(**values, source=source, origins=tuple(origins))

    return side_defaults("server"), side_defaults("client")

