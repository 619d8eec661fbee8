"""`--interface any`: one packet ring for every interface, those created after it opened included.

Checked against a capture on the bridge alone: the same segments, each once
(a packet crosses the veth and the bridge, and is dropped as a copy), with
interfaces that did not exist when the capture opened, and the keepalive
verdict the same as on the bridge.
"""
from __future__ import annotations

import time

import pytest

from sniffer.capture import LiveCapture
from sniffer.discovery import ANY, find_target
from sniffer.dissect import LINKTYPE_RAW
from tests.test_live import collect, netns_peer, vanishing_client_scenario


def test_any_is_an_interface_and_takes_the_place_of_the_others():
    assert find_target(interfaces=["lo", ANY]).interfaces == [ANY]
    assert LiveCapture(["eth0", ANY], [5432]).interfaces == [ANY]


@pytest.mark.privileged
def test_any_sees_each_packet_once_on_interfaces_made_after_it_opened():
    with LiveCapture([ANY], [5432]) as everywhere:
        assert everywhere.path == "ring" and everywhere.linktype == LINKTYPE_RAW
        on_any: list = []
        on_bridge: list = []
        thread_any = collect(everywhere, on_any)
        with netns_peer(bridge=True) as peer:  # the bridge and its veth are newer than the capture
            with LiveCapture([peer.bridge_if], [5432]) as bridge:
                thread_bridge = collect(bridge, on_bridge)
                vanishing_client_scenario(peer, answered_for=1.5)
                time.sleep(0.3)
                bridge.stop()
                everywhere.stop()
                thread_any.join(2)
                thread_bridge.join(2)
                stats = everywhere.stats()

    def key(s):
        return (s.src, s.sport, s.dst, s.dport, s.seq, s.ack, s.flags, s.payload_len)

    ours = [s for s in on_any if peer.ns_ip in (s.src, s.dst)]
    assert len(on_bridge) >= 10  # handshake, data, probes, answers, abort
    assert sorted(map(key, ours)) == sorted(map(key, on_bridge))
    assert stats.duplicates >= len(ours)  # every packet crossed the veth and the bridge: the copy was dropped
    assert [s.t for s in on_any] == sorted(s.t for s in on_any)
