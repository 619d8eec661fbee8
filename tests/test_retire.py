"""A retiring model (ended connections spooled to disk) must report exactly what a model that keeps all does.

`kaobs analyze` hands ended connections to `analysis.spool.ConnectionSpool`
so that its memory does not grow with the number of connections (issue 2).
The reports must not change by a byte. Every file in captures/ (with its
manifest expectations, none, and keepalives off, which makes an ended side's
judgement read the capture end) and a generated capture full of awkward cases
(port reuse, connections that began before the capture, RST after FIN,
segments long after the end, a side whose first pure ACK is still undecided
when its peer resets) go through the real CLI both ways, with lingers from 0 s
(retire at once, so every late segment takes a connection back from the
spool) to the default.
"""
from __future__ import annotations

import functools
import json
import struct
from pathlib import Path

import pytest

import analysis.pipeline as pipeline
import kaobs.cli as cli
from analysis.model import KeepaliveModel
from kaobs.spool import ConnectionSpool

ROOT = Path(__file__).resolve().parent.parent
CAPTURES = ROOT / "captures"
MANIFEST = json.loads((CAPTURES / "manifest.json").read_text())["captures"]

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


class CountingSpool(ConnectionSpool):
    """The real spool, remembering how much went through it (so no test passes by never retiring)."""

    puts = 0
    gets = 0

    def put(self, conn):
        CountingSpool.puts += 1
        super().put(conn)

    def get(self, index):
        CountingSpool.gets += 1
        return super().get(index)


def run_cli(monkeypatch, capsys, argv: list[str], linger: float | None) -> tuple[int, str]:
    """`kaobs analyze` as the console script runs it; linger None: the model keeps every connection."""
    with monkeypatch.context() as patch:
        if linger is None:
            patch.setattr(cli, "ConnectionSpool", lambda: None)
        else:
            patch.setattr(cli, "ConnectionSpool", CountingSpool)
            patch.setattr(pipeline, "KeepaliveModel", functools.partial(KeepaliveModel, linger=linger))
        capsys.readouterr()
        code = cli.run(["analyze", *argv])
        return code, capsys.readouterr().out


def assert_same_reports(monkeypatch, capsys, files: list[str], args: list[str], lingers=(0.0, 1.0, 5.0)) -> None:
    for output in (["--format", "json"], []):
        argv = [*files, *args, *output]
        reference = run_cli(monkeypatch, capsys, argv, None)
        assert reference[1].strip(), argv
        for linger in lingers:
            assert run_cli(monkeypatch, capsys, argv, linger) == reference, (argv, linger)


CASES = [(e["file"], e["expect_args"]) for e in MANIFEST]


@pytest.mark.parametrize("name,expect_args", CASES, ids=[c[0] for c in CASES])
def test_every_recorded_capture_reports_the_same_when_connections_retire(monkeypatch, capsys, name, expect_args):
    path = str(CAPTURES / name)
    for args in (expect_args, [], ["--client-dsn", "keepalives=0", "--expect", "tcp_keepalives_idle=1"]):
        assert_same_reports(monkeypatch, capsys, [path], args)


def test_all_recorded_captures_read_as_one_in_time_order_report_the_same(monkeypatch, capsys):
    """One file holds one scenario; read together, later files' new flows retire earlier connections."""
    def start(name: str) -> float:
        return json.loads(run_cli(monkeypatch, capsys, [str(CAPTURES / name), "--format", "json"], None)[1])["input"]["start"]

    files = [str(CAPTURES / name) for name in sorted((c[0] for c in CASES), key=start)]
    CountingSpool.puts = 0
    for args in (CASES[0][1], ["--client-dsn", "keepalives=0", "--expect", "tcp_keepalives_idle=1"]):
        assert_same_reports(monkeypatch, capsys, files, args)
    assert CountingSpool.puts > 0


# -- a generated capture of the awkward cases -------------------------------------

class Pcap:
    """A tiny Ethernet/IPv4 pcap writer (checksums left 0: kaobs does not check them)."""

    def __init__(self) -> None:
        self.records: list[bytes] = []
        self.ip_id = 0

    def packet(self, t: float, src: str, sport: int, dst: str, dport: int, seq: int, ack: int, flags: int,
               payload: int = 0, window: int = 500) -> None:
        self.ip_id = (self.ip_id + 1) & 0xFFFF
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + payload, self.ip_id, 0x4000, 64, 6, 0,
                         bytes(map(int, src.split("."))), bytes(map(int, dst.split("."))))
        tcp = struct.pack("!HHIIBBHHH", sport, dport, seq % (1 << 32), ack % (1 << 32), 0x50, flags, window, 0, 0)
        frame = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + tcp + b"x" * payload
        sec = int(t)
        self.records.append(struct.pack("<IIII", sec, int(round((t - sec) * 1e6)), len(frame), len(frame)) + frame)

    def write(self, path: Path) -> None:
        path.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1) + b"".join(self.records))


class Conn:
    """One client-server conversation; keeps both sides' next sequence numbers."""

    def __init__(self, cap: Pcap, client: str, cport: int, server: str = "10.9.0.1", sport: int = 5432,
                 cseq: int = 1000, sseq: int = 900000) -> None:
        self.cap, self.client, self.cport, self.server, self.sport = cap, client, cport, server, sport
        self.next = {"c": cseq, "s": sseq}

    def send(self, t: float, side: str, flags: int, payload: int = 0, seq_offset: int = 0) -> None:
        other = "s" if side == "c" else "c"
        src, sport, dst, dport = ((self.client, self.cport, self.server, self.sport) if side == "c"
                                  else (self.server, self.sport, self.client, self.cport))
        seq = self.next[side] + seq_offset
        self.cap.packet(t, src, sport, dst, dport, seq, self.next[other] if flags & ACK else 0, flags, payload)
        if seq_offset == 0:
            self.next[side] += payload + (1 if flags & (SYN | FIN) else 0)

    def handshake(self, t: float) -> None:
        self.send(t, "c", SYN)
        self.send(t + 0.001, "s", SYN | ACK)
        self.send(t + 0.002, "c", ACK)

    def query(self, t: float) -> None:
        self.send(t, "c", ACK | PSH, 40)
        self.send(t + 0.001, "s", ACK | PSH, 300)
        self.send(t + 0.05, "c", ACK)

    def close(self, t: float) -> None:
        self.send(t, "c", FIN | ACK)
        self.send(t + 0.001, "s", FIN | ACK)
        self.send(t + 0.002, "c", ACK)

    def probe(self, t: float, side: str, answered: bool) -> None:
        self.send(t, side, ACK, seq_offset=-1)
        if answered:
            self.send(t + 0.0005, "s" if side == "c" else "c", ACK)


def awkward_capture(path: Path) -> None:
    cap = Pcap()
    T = 1_800_000_000.0
    events = []  # (t, callable), sorted before writing so the pcap is in time order

    def at(t, fn, *a):
        events.append((t, len(events), fn, a))

    # Began before the capture: data, then FIN from both sides, a retransmitted FIN 40 s
    # later (long after any linger) and then a RST after the FIN (end_reason becomes reset).
    old = Conn(cap, "10.1.0.1", 40000)
    at(T, old.query, T)
    at(T + 1, old.close, T + 1)
    at(T + 41, old.send, T + 41, "s", FIN | ACK, 0, -1)
    at(T + 42, old.send, T + 42, "c", RST)
    # Port reuse: a connection closes, a new SYN on the same 4-tuple 20 s later; the new one probes.
    first = Conn(cap, "10.1.0.2", 40001)
    at(T + 0.5, first.handshake, T + 0.5)
    at(T + 0.6, first.query, T + 0.6)
    at(T + 1.0, first.close, T + 1.0)
    second = Conn(cap, "10.1.0.2", 40001, cseq=77777, sseq=555555)
    at(T + 20, second.handshake, T + 20)
    at(T + 20.1, second.query, T + 20.1)
    for k in range(3):
        at(T + 23.2 + 2 * k, second.probe, T + 23.2 + 2 * k, "s", True)
    at(T + 30, second.close, T + 30)
    # Reused again while the second was still open (client crashed and rebooted): a SYN on an open tuple.
    third = Conn(cap, "10.1.0.2", 40001, cseq=123, sseq=456)
    at(T + 50, third.handshake, T + 50)
    # Keepalive abort: unanswered probes, then RST; a late ACK from the vanished client 30 s after.
    dead = Conn(cap, "10.1.0.3", 40002)
    at(T + 0.2, dead.handshake, T + 0.2)
    at(T + 0.3, dead.query, T + 0.3)
    for k in range(3):
        at(T + 3.4 + k, dead.probe, T + 3.4 + k, "s", False)
    at(T + 6.4, dead.send, T + 6.4, "s", RST | ACK)
    at(T + 36.4, dead.send, T + 36.4, "c", ACK)
    # Reset by the client, then a late retransmission from the server after 25 s.
    reset = Conn(cap, "10.1.0.4", 40003)
    at(T + 2, reset.handshake, T + 2)
    at(T + 2.1, reset.query, T + 2.1)
    at(T + 3, reset.send, T + 3, "c", RST)
    at(T + 28, reset.send, T + 28, "s", ACK | PSH, 300, -300)
    # Began before the capture with a pure ACK from the server, then the client resets without
    # ACK: the server's first segment stays undecided (pending) until the end.
    pending = Conn(cap, "10.1.0.5", 40004)
    at(T + 0.7, pending.send, T + 0.7, "s", ACK)
    at(T + 0.8, pending.send, T + 0.8, "c", RST)
    # Half-closed: the client sends FIN, the server keeps sending data, then probes.
    half = Conn(cap, "10.1.0.6", 40005)
    at(T + 4, half.handshake, T + 4)
    at(T + 4.1, half.send, T + 4.1, "c", FIN | ACK)
    at(T + 4.2, half.send, T + 4.2, "s", ACK | PSH, 100)
    at(T + 14, half.send, T + 14, "s", ACK | PSH, 100)
    # A long-lived keepalive connection open to the end, and traffic on another port (ignored).
    idle = Conn(cap, "10.1.0.7", 40006)
    at(T + 0.1, idle.handshake, T + 0.1)
    for k in range(20):
        at(T + 3.1 + 3 * k, idle.probe, T + 3.1 + 3 * k, "c", True)
    other = Conn(cap, "10.1.0.8", 40007, sport=6432)
    at(T + 5, other.handshake, T + 5)
    # Many short connections throughout, so new flows keep sweeping; some reuse ports.
    for i in range(120):
        c = Conn(cap, f"10.2.{i % 3}.1", 50000 + i % 40, cseq=i * 1000, sseq=i * 7919)
        t = T + 0.25 * i
        at(t, c.handshake, t)
        at(t + 0.01, c.query, t + 0.01)
        if i % 7 == 0:
            at(t + 0.1, c.send, t + 0.1, "c", RST | ACK)
        elif i % 11 != 0:  # every 11th never closes
            at(t + 0.1, c.close, t + 0.1)
    # Ordered by start; each callable writes its packets in order. Merge by writing per event
    # into its own pcap, then sort all records by time (stable).
    records = []
    for t, order, fn, a in sorted(events, key=lambda e: (e[0], e[1])):
        before = len(cap.records)
        fn(*a)
        records.extend((struct.unpack_from("<II", r), len(records) + j, r) for j, r in enumerate(cap.records[before:]))
    cap.records = [r for _, _, r in sorted(records, key=lambda x: (x[0], x[1]))]
    cap.write(path)


def test_a_generated_capture_of_awkward_cases_reports_the_same(monkeypatch, capsys, tmp_path):
    path = tmp_path / "awkward.pcap"
    awkward_capture(path)
    CountingSpool.puts = CountingSpool.gets = 0
    for args in ([], ["--expect", "tcp_keepalives_idle=3", "--expect", "tcp_keepalives_interval=1"],
                 ["--client-dsn", "keepalives=0", "--expect", "tcp_keepalives_idle=2"]):
        assert_same_reports(monkeypatch, capsys, [str(path)], args, lingers=(0.0, 0.5, 5.0, 20.0))
    assert CountingSpool.puts > 100 and CountingSpool.gets > 0  # retired, and late segments took some back
    document = json.loads(run_cli(monkeypatch, capsys, [str(path), "--format", "json"], 0.0)[1])
    reasons = {c["end_reason"] for c in document["connections"]}
    assert {"closed", "reset", "keepalive_abort", "open"} <= reasons
    assert [c["id"] for c in document["connections"]] == list(range(1, len(document["connections"]) + 1))


def test_the_spool_gives_back_what_it_was_given_and_the_latest_copy(tmp_path):
    model = KeepaliveModel()
    with ConnectionSpool() as spool:
        from sniffer.records import TcpSegment

        model.feed(TcpSegment(1, 10.0, "10.0.0.1", 40000, "10.0.0.2", 5432, 5, 0, SYN, 100, 0))
        conn = model.connections[0]
        spool.put(conn)
        conn.end_reason = "closed"
        spool.put(conn)
        assert spool.holds(1) and not spool.holds(2) and spool.count == 1
        back = spool.get(1)
        assert back.end_reason == "closed" and back.client.endpoint == "10.0.0.1:40000" and back is not conn


def test_tombstones_find_every_entry_under_a_hash_and_survive_growth_and_removal():
    from analysis.model import Tombstones

    table = Tombstones()
    for index in range(1, 5001):
        table.add(index * 1_000_003 - 2**62, index)  # spread, negative hashes included
    table.add(7, 90001)
    table.add(7, 90002)  # a collision: both kept
    assert sorted(i for _, i in table.candidates(7)) == [90001, 90002]
    slot = next(s for s, i in table.candidates(7) if i == 90001)
    table.remove(slot)
    assert [i for _, i in table.candidates(7)] == [90002]
    assert [i for _, i in table.candidates(4321 * 1_000_003 - 2**62)] == [4321]
    assert list(table.candidates(8)) == [] and len(table) == 5001
