"""One packet captured on several interfaces, counted once.

``tcpdump -i any`` sees a packet that crosses a Docker bridge on the
container's veth and on the bridge; ``dumpcap -i veth -i docker0`` writes it
once per interface; a live capture on a bridge and one of its veths reads it
twice. A copy has the same IP and TCP headers but for what a router or bridge
changes (`sniffer.dissect.make_header_key`) and comes from another interface
within milliseconds; a retransmission or a repeated keepalive probe differs
(IP ID) or comes seconds later.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

from sniffer.dissect import LINKTYPE_LINUX_SLL2, make_header_key, sll2_ifindex

DEDUPE_WINDOW = 0.010
"""Copies of one packet on several interfaces are microseconds apart; probes are seconds."""
_MEMORY = 4096
_HORIZON = 2.0
"""How long keys are remembered: dumpcap writes each interface's packets as its
buffer fills, so a pcapng of several interfaces can go back in time by tens of ms."""


class RecentHeaders:
    """Header keys seen in the last few milliseconds, to drop per-interface copies.

    Memory is bounded: keys older than the horizon (longer than the window,
    since packets of different interfaces may come out of time order), or
    beyond a fixed count, are forgotten.
    """

    def __init__(self, window: float = DEDUPE_WINDOW, capacity: int = _MEMORY, horizon: float = _HORIZON):
        self.window = window
        self.capacity = capacity
        self.horizon = max(horizon, window)
        self._last: dict[bytes, tuple[float, tuple]] = {}
        self._order: deque[tuple[float, bytes]] = deque()

    def is_copy(self, key: bytes, interface: object, t: float) -> bool:
        """True if `key` was seen within the window on another interface.

        With no interface information (None: Linux cooked v1, classic pcap), any recent match is a copy.
        """
        last, order = self._last, self._order
        while order and (t - order[0][0] > self.horizon or len(order) > self.capacity):
            old_t, old_key = order.popleft()
            seen = last.get(old_key)
            if seen is not None and seen[0] == old_t:
                del last[old_key]
        seen = last.get(key)
        order.append((t, key))
        if (seen is not None and abs(t - seen[0]) <= self.window
                and (interface is None or interface not in seen[1])):
            last[key] = (t, seen[1] + (interface,))
            return True
        last[key] = (t, (interface,))
        return False


class CopyFilter:
    """Says which frames are copies of one seen on another interface; one per capture (or live run)."""

    def __init__(self) -> None:
        self.recent = RecentHeaders()
        self.copies = 0
        self._keys: dict[int, Callable[..., bytes | None]] = {}

    def is_copy(self, linktype: int, buf, off: int, end: int, t: float, interface: object = None) -> bool:
        """Is the frame at ``buf[off:end]`` a copy? `interface` names where it was captured.

        Without one, a Linux cooked v2 frame names its own interface index;
        other frames have none, and any recent match is then a copy.
        """
        key_of = self._keys.get(linktype)
        if key_of is None:
            key_of = self._keys[linktype] = make_header_key(linktype)
        key = key_of(buf, off, end)
        if key is None:
            return False
        if interface is None and linktype == LINKTYPE_LINUX_SLL2:
            interface = sll2_ifindex(buf, off)
        if self.recent.is_copy(key, interface, t):
            self.copies += 1
            return True
        return False
