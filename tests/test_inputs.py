"""Every input a user really has (issue 9): built files, real pipes and fifos, through the whole command.

Each test here failed before the fix it covers: a crash or a hang where the
promise is one line on stderr and exit 2, a wrong answer given without a
word, or a tcpdump/tshark habit kaobs did not follow. The files are made from
the real captures in captures/ (cut, reordered, recompressed, re-framed) or
byte by byte with `tests.pcap_builders`.
"""
from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zstandard

from sniffer.pcapfile import walk_records
from sniffer.pcapwrite import PcapWriter
from tests.pcap_builders import (
    Record,
    conversation,
    epb,
    frame_for,
    idb,
    pcap,
    shb,
    spb,
    times,
)

ROOT = Path(__file__).resolve().parents[1]
CAPTURES = ROOT / "captures"
SEED = CAPTURES / "seed_idle3_int2_cnt3_dead_client.pcap"
BOTH = CAPTURES / "both_sides_server_idle3_client_idle2.pcapng"
DEAD = CAPTURES / "dead_client_idle3_int2_cnt3.pcap"
SEED_EXPECT = ["--expect", "tcp_keepalives_idle=3", "--expect", "tcp_keepalives_interval=2",
               "--expect", "tcp_keepalives_count=3"]


def kaobs(*args: str, stdin=None, input: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "kaobs", *args], capture_output=True, stdin=stdin, input=input,
                          timeout=timeout, cwd=ROOT)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def bash(script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def no_traceback(done) -> None:
    assert "Traceback" not in done.stderr, done.stderr


def one_line_error(done, *needles: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kaobs: error: "), done.stderr
    no_traceback(done)
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def frames_of(path: Path) -> tuple[int, list[tuple[int, bytes, int]]]:
    """(linktype, [(t_ns, frame, wirelen)]) of a real classic pcap."""
    linktypes: list[int] = []

    def handler_for(linktype, units):
        linktypes.append(linktype)
        return lambda buf, start, end, frame, t, wirelen: (round(t * 1e9), bytes(buf[start:end]), wirelen)

    items, _ = walk_records(path, handler_for)
    records = list(items)
    return linktypes[0], records


def as_pcap(linktype: int, records, snaplen: int = 262144) -> bytes:
    return pcap([Record(t, data, wirelen) for t, data, wirelen in records], linktype, snaplen=snaplen, nsec=True)


def json_report(done) -> dict:
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)


# --- crashes and hangs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_timestamp_far_in_the_future_is_reported_not_a_crash(tmp_path, fmt):
    """One changed byte (143 = 0x40) moves a timestamp to year 148165: the text report crashed in the clock."""
    data = bytearray(BOTH.read_bytes())
    data[143] = 0x40
    path = tmp_path / "future.pcapng"
    path.write_bytes(bytes(data))
    done = kaobs("analyze", str(path), "--format", fmt)
    no_traceback(done)
    assert done.returncode in (0, 1), done.stderr
    if fmt == "text":
        assert "t=4.61" in done.stdout  # the time as a number, where no clock can read it
    assert "time goes backwards" in done.stderr


@pytest.mark.parametrize("offset", [2**62, -(2**62)], ids=["plus", "minus"])
def test_huge_if_tsoffset(tmp_path, offset):
    packets = conversation()
    blocks = [shb(), idb(1, tsoffset=offset), *[epb(0, t, frame_for(1, p)) for t, p in zip(times(9), packets)]]
    path = tmp_path / "offset.pcapng"
    path.write_bytes(b"".join(blocks))
    for fmt in ("text", "json"):
        done = kaobs("analyze", str(path), "--format", fmt)
        no_traceback(done)
        assert done.returncode == 0, done.stderr


def test_words_clock_of_any_float():
    from analysis.words import local_clock, utc_clock

    for t in (4.6e18, -4.6e18, float("nan"), float("inf"), 1e300):
        assert utc_clock(t).startswith("t=") and local_clock(t).startswith("t=")
    assert utc_clock(0.0) == "00:00:00.000"


def test_standard_input_and_dev_stdin_and_process_substitution():
    plain = kaobs("analyze", str(SEED), *SEED_EXPECT, "--format", "json")
    want = json_report(plain)["connections"]
    with open(SEED, "rb") as handle:
        dash = kaobs("analyze", "-", *SEED_EXPECT, "--format", "json", stdin=handle)
    assert json_report(dash)["connections"] == want
    assert json_report(dash)["input"]["sources"] == ["-"]
    piped = bash(f"cat {SEED} | {sys.executable} -m kaobs analyze /dev/stdin {' '.join(SEED_EXPECT)} --format json")
    assert piped.returncode == 0 and "Traceback" not in piped.stderr, piped.stderr
    assert json.loads(piped.stdout)["connections"] == want
    substituted = bash(f"{sys.executable} -m kaobs analyze <(gzip -c {SEED} | gzip -dc) {' '.join(SEED_EXPECT)} "
                       "--format json")
    assert substituted.returncode == 0, substituted.stderr
    assert json.loads(substituted.stdout)["connections"] == want


def test_pcapng_streamed_in_small_pieces_on_standard_input():
    """A capture agent streaming pcapng (kubectl gadget run tcpdump -o pcap-ng): blocks arrive in pieces."""
    expect = ["--expect", "tcp_keepalives_idle=3", "--client-dsn", "keepalives_idle=2", "--format", "json"]
    from_file = kaobs("analyze", str(BOTH), *expect)
    want = json_report(from_file)
    proc = subprocess.Popen([sys.executable, "-m", "kaobs", "analyze", "-", *expect], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    data = BOTH.read_bytes()
    for at in range(0, len(data), 700):
        proc.stdin.write(data[at:at + 700])
        proc.stdin.flush()
        time.sleep(0.002)
    stdout, stderr = proc.communicate(timeout=60)  # closes standard input: the end of the stream
    assert proc.returncode == from_file.returncode and b"Traceback" not in stderr, stderr
    got = json.loads(stdout)
    assert got["connections"] == want["connections"] and got["input"]["packets"] == want["input"]["packets"]


def test_standard_input_that_is_a_terminal_is_one_line():
    # A pty as stdin: `kaobs analyze -` typed at a prompt would wait forever for a capture that never comes.
    import pty

    main, secondary = pty.openpty()
    try:
        done = kaobs("analyze", "-", stdin=secondary)
    finally:
        os.close(main)
        os.close(secondary)
    one_line_error(done, "standard input is a terminal")


def test_fifo_with_a_writer(tmp_path):
    fifo = tmp_path / "capture.fifo"
    os.mkfifo(fifo)

    def feed():
        with open(fifo, "wb") as out:
            out.write(SEED.read_bytes())

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    done = kaobs("analyze", str(fifo), *SEED_EXPECT, timeout=60)
    writer.join(10)
    assert done.returncode == 0, done.stderr
    assert "MATCH" in done.stdout and "ABORT (RST) after 3 unanswered probe(s)" in done.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_fifo_streaming_then_interrupted_gives_the_report(tmp_path, sig):
    """tcpdump -w fifo: kaobs waits as tcpdump does; Ctrl-C (or SIGTERM) ends the reading, not the report."""
    fifo = tmp_path / "live.fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-m", "kaobs", "analyze", str(fifo), *SEED_EXPECT, "--format", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        with open(fifo, "wb") as out:  # opens once kaobs has opened its end
            out.write(SEED.read_bytes())
            out.flush()
            time.sleep(1.0)  # the writer stays, as a running tcpdump does
            proc.send_signal(sig)
            stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert b"Traceback" not in stderr, stderr
    doc = json.loads(stdout)
    assert proc.returncode == 0, stderr
    assert doc["summary"]["match"] == 1 and doc["input"]["packets"] == 18
    assert any("interrupted after 18 packets" in w for w in doc["input"]["warnings"])


def test_fifo_without_a_writer_waits_and_ctrl_c_reports(tmp_path):
    fifo = tmp_path / "nobody.fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-m", "kaobs", "analyze", str(fifo)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT, text=True)
    time.sleep(1.5)
    assert proc.poll() is None  # waiting for a writer, as tcpdump -r fifo does
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert "Traceback" not in stderr and proc.returncode == 0, stderr
    assert "No Postgres connection" in stdout and "interrupted after 0 packets" in stderr


@pytest.mark.parametrize("option", [["watch", "--duration", "nan"], ["watch", "--duration", "inf"],
                                    ["lab", "--fault-after", "nan"], ["lab", "--duration", "nan"]],
                         ids=["watch-nan", "watch-inf", "lab-fault-after-nan", "lab-duration-nan"])
def test_durations_must_be_finite(option):
    one_line_error(kaobs(*option), "not a finite number")


@pytest.fixture(scope="module")
def many_connections(tmp_path_factory) -> Path:
    """1500 short connections: a report far larger than a pipe's buffer, so `| head` really closes it early."""
    records = []
    stamps = iter(times(1500 * 9, step_ns=1_000_000))
    for i in range(1500):
        records += [Record(next(stamps), frame_for(1, p)) for p in conversation(sport=20000 + i)]
    path = tmp_path_factory.mktemp("many") / "many.pcap"
    path.write_bytes(pcap(records, 1))
    return path


@pytest.mark.parametrize("expect, status", [([], 0), (["--expect", "tcp_keepalives_idle=1"], 1)],
                         ids=["match", "mismatch"])
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_closed_stdout_is_not_a_failure(many_connections, expect, status, fmt):
    done = bash(f"{sys.executable} -m kaobs analyze {many_connections} {' '.join(expect)} --format {fmt} "
                "| head -c 10 >/dev/null; exit ${PIPESTATUS[0]}")
    assert done.returncode == status, done.stderr
    assert done.stderr.strip() == "", done.stderr


def test_ctrl_c_while_the_dsn_connects_says_so(tmp_path):
    """A server that accepts TCP and never speaks: Ctrl-C must not be reported as a server error."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kaobs", "analyze", str(SEED), "--dsn",
             f"host=127.0.0.1 port={port} user=kaobs password=Sekr3tPw connect_timeout=30"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, text=True)
        time.sleep(2.0)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        listener.close()
    assert proc.returncode == 2 and "Traceback" not in stderr, stderr
    [line] = stderr.strip().splitlines()
    assert "interrupted while connecting" in line and "Sekr3tPw" not in line
    assert "terminated abnormally" not in line and "no answer" not in line and "timeout expired" not in line
    assert "1 connection(s)" in stdout  # the packet analysis is still printed


# --- wrong answers without a word -----------------------------------------------------------------------


def _rotated(tmp_path: Path) -> tuple[Path, Path]:
    """The dead-client capture cut in two, as tcpdump -C writes it: pg.pcap2 holds the start, pg.pcap10 the rest."""
    linktype, records = frames_of(DEAD)
    half = len(records) // 2
    first, second = tmp_path / "pg.pcap2", tmp_path / "pg.pcap10"
    first.write_bytes(as_pcap(linktype, records[:half]))
    second.write_bytes(as_pcap(linktype, records[half:]))
    return first, second


def test_files_given_out_of_time_order_are_read_in_time_order(tmp_path):
    first, second = _rotated(tmp_path)
    in_order = json_report(kaobs("analyze", str(first), str(second), *SEED_EXPECT, "--format", "json"))
    assert in_order["summary"]["match"] == 1 and not in_order["input"]["warnings"]
    # a glob (pg.pcap*) puts pg.pcap10 before pg.pcap2
    done = kaobs("analyze", str(second), str(first), *SEED_EXPECT, "--format", "json")
    doc = json_report(done)
    assert done.returncode == 0
    assert doc["connections"] == in_order["connections"] and doc["summary"] == in_order["summary"]
    assert doc["input"]["sources"] == [str(first), str(second)]
    assert any("out of time order" in w for w in doc["input"]["warnings"])
    assert all(c["end"] >= c["start"] for c in doc["connections"])


def test_time_going_backwards_inside_a_file_is_said(tmp_path):
    linktype, records = frames_of(DEAD)
    moved = [(t - 800 * 10**9 if i == 5 else t, data, wirelen) for i, (t, data, wirelen) in enumerate(records)]
    path = tmp_path / "back.pcap"
    path.write_bytes(as_pcap(linktype, moved))
    doc = json_report(kaobs("analyze", str(path), "--format", "json"))
    assert doc["input"]["time_backwards"] == 1
    [warning] = [w for w in doc["input"]["warnings"] if "time goes backwards" in w]
    assert "at 1 packet(s), by up to 799999." in warning and "frame 6" in warning and "wrong" in warning


def test_overlapping_files_are_said(tmp_path):
    first, second = _rotated(tmp_path)
    linktype, records = frames_of(first)
    again = tmp_path / "again.pcap"
    again.write_bytes(as_pcap(linktype, records[-3:]))  # the end of the first file once more
    done = kaobs("analyze", str(first), str(again), str(second))
    no_traceback(done)
    assert "begins" in done.stderr and "before" in done.stderr and "overlapping" in done.stderr


def test_simple_packet_blocks_are_not_timed_and_not_judged(tmp_path):
    """SPBs carry no time: everything landed at t=0 and --expect tcp_keepalives_idle=1 gave a MISMATCH."""
    linktype, records = frames_of(SEED)
    blocks = [shb(), idb(linktype)] + [spb(data, wirelen=wirelen) for _, data, wirelen in records]
    path = tmp_path / "spb.pcapng"
    path.write_bytes(b"".join(blocks))
    done = kaobs("analyze", str(path), "--expect", "tcp_keepalives_idle=1", "--format", "json")
    doc = json_report(done)
    assert done.returncode == 0 and doc["summary"]["mismatch"] == 0
    assert doc["input"]["unreadable_packets"]["untimed"] == 18
    assert any("Simple Packet Blocks" in w and "no timestamp" in w for w in doc["input"]["warnings"])
    # Mixed: the timed packets of the connection are shown, but nothing is judged on it.
    mixed = [shb(), idb(linktype)] + [epb(0, t, data, wirelen=wirelen) if i % 2 else spb(data, wirelen=wirelen)
                                      for i, (t, data, wirelen) in enumerate(records)]
    path.write_bytes(b"".join(mixed))
    doc = json_report(kaobs("analyze", str(path), *SEED_EXPECT, "--format", "json"))
    [conn] = doc["connections"]
    assert conn["sides"]["server"]["findings"] == [] and conn["verdict"] != "mismatch"


@pytest.mark.parametrize("capture, snaplen", [
    ("ipv6_dead_client_idle2_int1_cnt2.pcap", 64),           # tcpdump -s 64 over IPv6
    ("any_interface_dead_client_idle2_int1_cnt2.pcap", 56),  # tcpdump -i any -s 56
])
def test_a_snaplen_too_small_for_the_tcp_header_is_said(tmp_path, capture, snaplen):
    linktype, records = frames_of(CAPTURES / capture)
    cut = tmp_path / f"s{snaplen}.pcap"
    cut.write_bytes(as_pcap(linktype, records, snaplen=snaplen))
    done = kaobs("analyze", str(cut), "--format", "json")
    doc = json_report(done)
    assert doc["connections"] == []
    assert doc["input"]["unreadable_packets"]["cut_by_snaplen"] == len(records)
    [warning] = [w for w in doc["input"]["warnings"] if "snaplen" in w]
    needed = int(warning.rsplit("tcpdump -s ", 1)[1].rstrip(")"))
    # that snaplen really is enough
    enough = tmp_path / f"s{needed}.pcap"
    enough.write_bytes(as_pcap(linktype, records, snaplen=needed))
    whole = json_report(kaobs("analyze", str(enough), "--format", "json"))
    assert len(whole["connections"]) >= 1 and whole["input"]["unreadable_packets"]["cut_by_snaplen"] == 0
    text = kaobs("analyze", str(cut))
    assert f"tcpdump -s {needed}" in text.stderr and "No Postgres connection" in text.stdout


def test_a_capture_that_starts_during_the_unanswered_probes(tmp_path):
    """tcpdump started during an incident: the probes and the abort were missed and the opposite was claimed."""
    linktype, records = frames_of(SEED)
    full = json_report(kaobs("analyze", str(SEED), *SEED_EXPECT, "--format", "json"))
    probes = full["connections"][0]["sides"]["server"]["probes"]
    first_unanswered = next(p["frame"] for p in probes if not p["answered"])
    second_unanswered = [p["frame"] for p in probes if not p["answered"]][1]
    path = tmp_path / "late.pcap"
    path.write_bytes(as_pcap(linktype, records[second_unanswered - 1:]))  # from the 2nd unanswered probe on
    doc = json_report(kaobs("analyze", str(path), *SEED_EXPECT, "--format", "json"))
    [conn] = doc["connections"]
    server = conn["sides"]["server"]
    assert conn["verdict"] != "no_keepalive" and conn["end_reason"] == "keepalive_abort"
    assert server["keepalive_probes"] == 2 and server["abort"]["reason"] == "keepalive_count"
    status = {f["setting"]: f for f in server["findings"]}
    assert status["tcp_keepalives_interval"]["status"] == "match"
    for setting in ("tcp_keepalives_count", "tcp_keepalives_idle"):
        assert status[setting]["status"] == "unobservable"
        assert "the capture began during the probes" in status[setting]["detail"]
    assert server["observed"]["count"] is None  # at least 2, not 2
    text = kaobs("analyze", str(path), *SEED_EXPECT)
    assert "ABORT (RST) after at least 2 unanswered probe(s)" in text.stdout
    assert "RST (not a keepalive abort)" not in text.stdout and first_unanswered < second_unanswered


def test_probes_seen_without_their_start_or_their_end_and_window_updates_are_not_probes():
    """The model on built segments: a series cut at both ends is still probes; a repeated ACK with a new window is not."""
    from analysis.model import KeepaliveModel
    from tests.builders import Conversation

    talk = Conversation().handshake().exchange(0.1)
    talk.probe("server", 3.1).probe("server", 5.1).probe("server", 7.1).probe("server", 9.1)
    model = KeepaliveModel([5432]).feed_all(talk.segments[-3:])  # probes 2-4: no start, no end, no answer
    model.finish()
    [conn] = model.connections
    assert [p.kind for p in conn.server.probes] == ["keepalive"] * 3
    update = Conversation().handshake().exchange(0.1)
    update.ack("client", 2.0).set_window("client", 900).ack("client", 2.5)  # a window update, not a probe
    model = KeepaliveModel([5432]).feed_all(update.segments[-2:])
    model.finish()
    [conn] = model.connections
    assert conn.client.probes == []


def test_unsupported_link_type_on_an_unused_interface_or_a_later_section(tmp_path):
    linktype, records = frames_of(SEED)
    wifi = b"\x08\x00" + bytes(40)
    unused = [shb(), idb(linktype), idb(105)] + [epb(0, t, d, wirelen=w) for t, d, w in records]
    later = list(unused) + [shb(), idb(105), epb(0, records[-1][0], wifi), epb(0, records[-1][0], wifi)]
    used = [shb(), idb(linktype), idb(105)] + [epb(0, t, d, wirelen=w) for t, d, w in records] + [
        epb(1, records[-1][0], wifi)]
    for name, blocks, skipped in (("unused", unused, 0), ("later", later, 2), ("used", used, 1)):
        path = tmp_path / f"{name}.pcapng"
        path.write_bytes(b"".join(blocks))
        done = kaobs("analyze", str(path), *SEED_EXPECT, "--format", "json")
        doc = json_report(done)
        assert done.returncode == 0 and doc["summary"]["match"] == 1, name
        assert doc["input"]["unreadable_packets"]["unsupported_link_type"] == skipped
        if skipped:
            assert any(f"{skipped} packet(s) on interfaces of link type 105 (IEEE 802.11) skipped" in w
                       for w in doc["input"]["warnings"])
    only = tmp_path / "only-wifi.pcapng"
    only.write_bytes(shb() + idb(105) + epb(0, records[0][0], wifi))
    one_line_error(kaobs("analyze", str(only)), "105")


def test_container_without_dsn_is_refused():
    one_line_error(kaobs("analyze", str(SEED), "--container", "pg"), "--container needs --dsn")


# --- security ---------------------------------------------------------------------------------------------


def test_captures_are_written_0600(tmp_path):
    frame = frame_for(1, conversation()[3])
    os.umask(0o022)
    new = tmp_path / "new.pcap"
    with PcapWriter(new, 1) as writer:
        writer.write(frame, 1.0, full=True)
    assert stat.S_IMODE(new.stat().st_mode) == 0o600
    old = tmp_path / "old.pcap"
    old.write_bytes(b"x")
    old.chmod(0o644)
    with PcapWriter(old, 1):
        pass
    assert stat.S_IMODE(old.stat().st_mode) == 0o600  # truncating keeps a file's mode: it is set again
    asked = tmp_path / "shared.pcap"
    with PcapWriter(asked, 1, mode=0o644):
        pass
    assert stat.S_IMODE(asked.stat().st_mode) == 0o644


def test_write_mode_option_is_octal():
    from kaobs.options import FileMode

    assert FileMode().convert("600", None, None) == 0o600 and FileMode().convert("0o644", None, None) == 0o644
    one_line_error(kaobs("watch", "--write-mode", "999"), "not a file mode")


# --- tcpdump and tshark habits ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gzip", "zstd", "xz", "bzip2"])
def test_compressed_captures_are_read_by_their_magic(tmp_path, kind):
    data = SEED.read_bytes()
    packed = {"gzip": gzip.compress, "xz": lzma.compress, "bzip2": bz2.compress,
              "zstd": lambda d: zstandard.ZstdCompressor().compress(d)}[kind](data)
    for name in (f"seed.pcap.{kind}", "seed.pcap"):  # the name does not matter, the first bytes do
        path = tmp_path / name
        path.write_bytes(packed)
        done = kaobs("analyze", str(path), *SEED_EXPECT)
        assert done.returncode == 0 and "MATCH" in done.stdout, done.stderr


def test_streamed_zstd_and_a_cut_gzip(tmp_path):
    streamed = tmp_path / "s.pcap.zst"
    done = bash(f"cat {SEED} | zstd -q -c > {streamed}")  # no content size in the frame header
    if done.returncode != 0:
        pytest.fail(f"zstd: {done.stderr}")
    assert kaobs("analyze", str(streamed), *SEED_EXPECT).returncode == 0
    cut = tmp_path / "cut.pcap.gz"
    whole = gzip.compress(DEAD.read_bytes())
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    done = kaobs("analyze", str(cut))
    no_traceback(done)
    assert done.returncode == 0 and "gzip stream cut off after" in done.stderr, done.stderr


def test_read_option_and_a_filter_expression(tmp_path):
    everything = json_report(kaobs("analyze", "-r", str(SEED), "--format", "json"))
    assert everything["input"]["filter"] is None and len(everything["connections"]) == 1
    # tcpdump -r FILE EXPRESSION: every argument after -r is the expression
    other_port = json_report(kaobs("analyze", "-r", str(SEED), "tcp", "port", "5433", "--format", "json"))
    assert other_port["connections"] == []
    assert other_port["input"]["filter"] == {"expression": "tcp port 5433", "since": None, "until": None,
                                             "filtered_out": 18}
    # kaobs analyze FILE 'EXPRESSION'
    resets = kaobs("analyze", str(SEED), "tcp[tcpflags] & tcp-rst != 0")
    assert "17 left out by the filter" in resets.stdout
    any_interface = CAPTURES / "any_interface_dead_client_idle2_int1_cnt2.pcap"  # Linux cooked v2
    ported = json_report(kaobs("analyze", str(any_interface), "tcp port 5432", "--format", "json"))
    assert ported["input"]["filter"]["filtered_out"] == 0 and len(ported["connections"]) == 1
    one_line_error(kaobs("analyze", str(SEED), "host 10.0.0.5 andd"), "bad filter expression", "syntax error")
    one_line_error(kaobs("analyze", str(SEED), str(tmp_path / "missing.pcap")), "missing.pcap: no such file")
    one_line_error(kaobs("analyze", "nope.pcap"), "nope.pcap: no such file")
    one_line_error(kaobs("analyze"), "no capture given")


def test_since_and_until(tmp_path):
    doc = json_report(kaobs("analyze", str(SEED), "--format", "json"))
    start, end = doc["input"]["start"], doc["input"]["end"]
    later = json_report(kaobs("analyze", str(SEED), "--since", f"{end + 1:.6f}", "--format", "json"))
    assert later["connections"] == [] and later["input"]["filter"]["filtered_out"] == 18
    import datetime as dt

    iso = dt.datetime.fromtimestamp(start - 1, dt.timezone.utc).replace(tzinfo=None).isoformat()
    same = json_report(kaobs("analyze", str(SEED), "--since", iso, "--until", f"{end + 1}", "--format", "json"))
    assert same["connections"] == doc["connections"] and same["input"]["filter"]["filtered_out"] == 0
    one_line_error(kaobs("analyze", str(SEED), "--since", "yesterday"), "not a time")
    one_line_error(kaobs("analyze", str(SEED), "--since", "20", "--until", "10"), "--since is after --until")


def test_lab_default_image(monkeypatch):
    from kaobs.lab import docker

    monkeypatch.delenv(docker.IMAGE_ENV, raising=False)
    present: set[str] = set()
    monkeypatch.setattr(docker, "image_present", lambda image: image in present)
    assert docker.default_image() == "postgres"  # nothing here: check_image says what to do
    present.add(docker.LOCAL_IMAGE)
    assert docker.default_image() == docker.LOCAL_IMAGE
    present.add("postgres")
    assert docker.default_image() == "postgres"
    monkeypatch.setenv(docker.IMAGE_ENV, "mine:1")
    assert docker.default_image() == "mine:1"

