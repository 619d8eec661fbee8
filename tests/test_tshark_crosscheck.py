"""kaobs's keepalive probes against tshark's `tcp.analysis.keep_alive`, on every real capture.

tshark is an independent reader and an independent TCP analysis: if both
agree on which frames are keepalive probes, neither the capture reader nor the
probe detection of kaobs can be badly wrong. The sets must be equal up to two
differences that are tshark's and are explained here, both seen on these
captures:

1. Zero-window probes. Linux's persist timer sends the same segment as a
   keepalive (pure ACK, seq = snd_nxt - 1, 0 bytes); tshark 4.0 flags it
   `TCP Keep-Alive` (zero_window_client_stops_reading.pcap: all 6 of the
   server's probes). kaobs tells them apart (the peer advertised window 0 /
   data is queued) and reports them as `kind: "window"`: they are removed from
   tshark's set, and each of them must be in tshark's set (same shape).
2. `tcpdump -i any` copies. Each packet crossing the lab bridge is captured on
   two veths (the client's, SLL2 packet type "other host", and the server's,
   "outgoing"; the bridge device itself does not see forwarded frames). tshark
   analyses the copies as packets of their own: it flags the second copy of
   every probe as another keep-alive (any_interface_...pcap: 4 probes, 8
   flags), and, when the client asks for SSL first (libpq's sslmode=prefer),
   the second copy of the server's 1-byte 'N' answer too (a segment of 0-1
   byte at "next seq - 1" is its keep-alive heuristic). kaobs counts
   one packet once (the first copy: `input.duplicates_dropped`), so tshark's
   flags on later copies are dropped here; copies are found independently of
   kaobs, from tshark's own fields (same IP/TCP header fields and TCP
   timestamp, another interface, within 10 ms).
Frame numbers are the file's (tshark's `frame.number`): kaobs reports the
number of the copy it kept.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.test_captures import CAPTURES, ENTRIES, analyse

FIELDS = ["frame.number", "frame.time_epoch", "sll.ifindex", "ip.src", "ipv6.src", "ip.id", "tcp.srcport", "tcp.dstport",
          "tcp.seq_raw", "tcp.ack_raw", "tcp.flags", "tcp.len", "tcp.window_size_value", "tcp.options.timestamp.tsval",
          "tcp.analysis.keep_alive"]
COPY_WINDOW = 0.010  # seconds: copies of one packet on two veths are microseconds apart


def tshark_missing() -> str | None:
    if shutil.which("tshark") is None:
        return "tshark is not installed (apt-get install tshark; CI installs it)"
    return None


@pytest.fixture
def need_tshark():
    reason = tshark_missing()
    if reason:
        if os.environ.get("KAOBS_REQUIRE_PRIVILEGED") == "1":
            pytest.fail(f"KAOBS_REQUIRE_PRIVILEGED=1 but {reason}")
        pytest.skip(reason)


def tshark_rows(path: Path) -> list[dict[str, str]]:
    argv = ["tshark", "-n", "-r", str(path), "-Y", "tcp", "-T", "fields", "-E", "separator=\t", "-E", "occurrence=f"]
    for name in FIELDS:
        argv += ["-e", name]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [dict(zip(FIELDS, line.split("\t"))) for line in done.stdout.splitlines() if line]


def later_copies(rows: list[dict[str, str]]) -> set[int]:
    """Frames that repeat, on another interface and within COPY_WINDOW, a packet already seen."""
    identity = [name for name in FIELDS if name not in ("frame.number", "frame.time_epoch", "sll.ifindex", "tcp.analysis.keep_alive")]
    seen: dict[tuple[str, ...], tuple[float, str]] = {}
    copies = set()
    for row in rows:
        key = tuple(row[name] for name in identity)
        t, ifindex = float(row["frame.time_epoch"]), row["sll.ifindex"]
        first = seen.get(key)
        if first is not None and ifindex and first[1] != ifindex and t - first[0] <= COPY_WINDOW:
            copies.add(int(row["frame.number"]))
            continue
        seen[key] = (t, ifindex)
    return copies


def kaobs_probe_frames(document: dict[str, Any]) -> tuple[set[int], set[int]]:
    keepalive, window = set(), set()
    for conn in document["connections"]:
        for side in conn["sides"].values():
            for probe in side["probes"]:
                (keepalive if probe["kind"] == "keepalive" else window).add(probe["frame"])
    return keepalive, window


def cross_check(path: Path, entry: dict[str, Any], capsys) -> dict[str, int]:
    """Assert kaobs's keepalive frames == tshark's keep_alive frames minus window probes and later copies."""
    _, document = analyse(path, entry["expect_args"], capsys)
    keepalive, window = kaobs_probe_frames(document)
    rows = tshark_rows(path)
    flagged = {int(r["frame.number"]) for r in rows if r["tcp.analysis.keep_alive"]}
    copies = later_copies(rows)
    assert len(copies) == document["input"]["duplicates_dropped"], \
        f"{path.name}: tshark's fields show {len(copies)} copies, kaobs dropped {document['input']['duplicates_dropped']}"
    assert window <= flagged, f"{path.name}: zero-window probes tshark does not flag: {sorted(window - flagged)}"
    expected = flagged - window - copies
    assert keepalive == expected, (
        f"{path.name}: kaobs-only {sorted(keepalive - expected)}, tshark-only {sorted(expected - keepalive)}")
    return {"tshark_flagged": len(flagged), "kaobs_keepalive": len(keepalive), "window": len(window),
            "flagged_copies": len(flagged & copies)}


@pytest.mark.tshark
@pytest.mark.parametrize("entry", ENTRIES, ids=[e["file"] for e in ENTRIES])
def test_keepalive_probes_equal_tshark_keep_alive(entry, capsys, need_tshark):
    counts = cross_check(CAPTURES / entry["file"], entry, capsys)
    must = {c["path"]: c for c in entry["must_show"]}
    if "input.duplicates_dropped" in must:
        assert counts["flagged_copies"] > 0, "tshark flags the -i any copies of the probes: the check must have seen them"
    if entry["how"].get("scenario") == "stop_reading":
        assert counts["window"] > 0 and counts["kaobs_keepalive"] == 0


def test_copies_are_found_from_tshark_fields():
    """The copy finder must find copies, and must not merge a repeated probe with its predecessor."""
    row = dict.fromkeys(FIELDS, "")
    probe = {**row, "frame.number": "1", "frame.time_epoch": "100.0", "sll.ifindex": "3", "tcp.seq_raw": "77",
             "tcp.options.timestamp.tsval": "5", "tcp.analysis.keep_alive": "1"}
    copy = {**probe, "frame.number": "2", "frame.time_epoch": "100.00002", "sll.ifindex": "4"}
    again = {**probe, "frame.number": "3", "frame.time_epoch": "101.0", "tcp.options.timestamp.tsval": "6"}
    same_iface = {**probe, "frame.number": "4", "frame.time_epoch": "100.00003"}
    assert later_copies([probe, copy, again, same_iface]) == {2}
    assert json.dumps(sorted(later_copies([probe, again]))) == "[]"
