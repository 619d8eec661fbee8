"""`kaobs watch`: the live pipeline on replayed segments, the live view, and the command's errors.

The unprivileged tests replay conversations built in code through a fake
capture with a simulated clock, so alarms and per-event lines are checked
without a network. The privileged test at the bottom runs the real command
on a veth pair between two network namespaces.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from rich.console import Console

from analysis.expect import build_expectations
from analysis.model import KeepaliveModel
from analysis.outlook import LiveMonitor
from kaobs.liveview import LiveHeader, alarm_line, event_line, live_table, live_view
from kaobs.watch import install_stop_handlers, run_live
from sniffer.capture import LiveStats
from sniffer.records import record_of
from tests.builders import Conversation
from tests.test_model import SEED_EXPECT, seed_conversation


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class ReplayCapture:
    """Stands in for LiveCapture: hands out the records of recorded segments as the simulated clock passes them."""

    interfaces = ["fake0"]
    filter = "tcp port 5432"

    def __init__(self, segments, clock: FakeClock, on_read=None) -> None:
        self.pending = list(segments)
        self.clock = clock
        self.started = clock.t
        self.delivered = 0
        self.reads = 0
        self.on_read = on_read

    def open(self):
        return self

    def read(self, timeout: float = 0.1):
        self.reads += 1
        if self.on_read is not None:
            self.on_read(self)
        self.clock.t += max(timeout, 0.001)
        out = []
        while self.pending and self.pending[0].t <= self.clock.t:
            out.append(record_of(self.pending.pop(0)))
        self.delivered += len(out)
        return out

    def stats(self) -> LiveStats:
        return LiveStats(packets=self.delivered, segments=self.delivered)


def replay(conv: Conversation, expect=SEED_EXPECT, *, output_format="text", duration=20.0, stop=None, on_read=None,
           terminal=False):
    clock = FakeClock(conv.t0 - 0.5)
    capture = ReplayCapture(conv.segments, clock, on_read)
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=160, highlight=False, color_system=None)
    run, reports = run_live(
        capture, expectations=build_expectations(expect), ports=(5432,), hz=250, output_format=output_format,
        duration=duration, stop=stop or threading.Event(), console=console, title="replay", clock=clock)
    return run, reports, out.getvalue(), capture


def lines_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# -- one line per event ----------------------------------------------------------


def test_event_lines_name_probes_answers_and_the_abort_in_order():
    lines: list[str] = []
    model = KeepaliveModel(on_event=lambda e: lines.append(e))
    events = []
    for segment in seed_conversation().segments:
        model.feed(segment)
        events.extend(event_line(e) for e in lines)
        lines.clear()
    text = [e for e in events if e]
    assert "new connection" in text[0] and "10.9.0.2:41000 -> 10.9.0.1:5432" in text[0]
    probes = [line for line in text if "server keepalive probe" in line]
    assert len(probes) == 5
    assert "3.012 s after the last packet it accepted" in probes[0]  # 3.054 - 0.042
    answers = [line for line in text if "client answered server probe" in line]
    assert [a.split("server probe ")[1][0] for a in answers] == ["1", "2"]
    assert "ABORT (RST) after 3 unanswered" in text[-1]
    # numbered across the connection, as the final report does; the series (restarting after each
    # answer) is its own count: probes 4 and 5 are the 2nd and 3rd of the last series
    assert [p.split("keepalive probe ")[1][0] for p in probes] == ["1", "2", "3", "4", "5"]
    assert "2 in the series (1 unanswered before it)" in probes[3]
    assert "3 in the series (2 unanswered before it)" in probes[4]


def test_mid_connection_start_is_not_called_new():
    conv = Conversation().handshake().exchange(0.01)
    model = KeepaliveModel(on_event=lambda e: seen.append(e))
    seen: list = []
    for segment in conv.segments[3:]:
        model.feed(segment)
    first = event_line(seen[0])
    assert "already open" in first and "new connection" not in first


def test_run_live_prints_events_and_alarms_as_lines_with_wall_clock_times():
    run, [report], text, capture = replay(seed_conversation(t_rst=None))
    out = lines_of(text)
    alarms = [line for line in out if " ALARM " in line]
    assert len(alarms) == 3, out
    assert "2 of 3 probes unanswered" in alarms[0] and "abort expected at" in alarms[0]
    assert "3 of 3 probes unanswered" in alarms[1]
    assert "should have aborted" in alarms[2]
    # the peer-silent alarm comes right after the second unanswered probe, before the third
    third_probe = next(i for i, line in enumerate(out) if "keepalive probe 5" in line)
    assert out.index(alarms[0]) < third_probe < out.index(alarms[1]) < out.index(alarms[2])
    # raised within the 0.25 s alarm check period of the probe that made it true
    assert alarms[0].startswith("22:13:31.") or alarms[0][:8] == out[third_probe - 1][:8]
    # every event line starts with a wall-clock time
    for line in out[1:]:
        assert line[2] == ":" and line[5] == ":" and line[8] == ".", line
    assert report.verdict == "mismatch"  # the abort the settings require never came
    assert run.packets == len(seed_conversation(t_rst=None).segments)
    assert run.sources == ["live:fake0"]


def test_run_live_with_the_abort_matches_and_raises_no_missing_abort_alarm():
    run, [report], text, _ = replay(seed_conversation())
    assert report.verdict == "match"
    assert "should have aborted" not in text
    assert "ABORT (RST) after 3 unanswered" in text



def test_a_peer_back_after_the_abort_does_not_undo_it():
    """Seen live: the vanished client, killed later, sends its FIN; the server's kernel answers RST.

    That RST answers a segment after the connection ended: the keepalive abort stands.
    """
    from sniffer.records import RST

    conv = seed_conversation()
    conv.fin("client", 15.3)
    conv._emit("server", 15.3001, RST, conv.server.next_seq)
    _, [report], text, _ = replay(conv)
    assert report.connection.end_reason == "keepalive_abort"
    assert report.server.abort is not None and report.server.abort.t == pytest.approx(conv.t0 + 15.13)
    assert report.verdict == "match"
    assert "not a keepalive abort" not in text
    assert "client found out the connection had ended, 0.170 s later, on its next send (FIN)" in text
    after = report.after_end
    assert after is not None and after.side == "client" and after.what == "FIN" and after.told_t is not None

def test_overdue_probe_alarm_says_keepalives_are_not_running():
    conv = Conversation().handshake().exchange(0.01)
    _, [report], text, _ = replay(conv, ("tcp_keepalives_idle=3",), duration=6.0)
    [alarm] = [line for line in lines_of(text) if " ALARM " in line]
    assert "no probe" in alarm and "not running" in alarm


def test_json_mode_prints_nothing_while_watching():
    run, reports, text, _ = replay(seed_conversation(t_rst=None), output_format="json")
    assert text == ""
    assert reports and reports[0].verdict == "mismatch"


def test_stop_event_ends_the_run_within_one_read():
    stop = threading.Event()

    def stop_after_five_reads(capture):
        if capture.reads == 5:
            stop.set()

    _, _, _, capture = replay(seed_conversation(), duration=None, stop=stop, on_read=stop_after_five_reads)
    assert capture.reads == 5


def test_duration_bounds_the_run():
    _, reports, _, capture = replay(seed_conversation(), duration=4.0)
    # only what came in the first 4 s (from 0.5 s before the first packet) was seen
    assert reports[0].server.keepalive_probe_count == 1
    assert capture.pending


def test_keyboard_interrupt_ends_the_run_with_a_report():
    def interrupt(capture):
        if capture.reads == 40:
            raise KeyboardInterrupt

    run, reports, _, _ = replay(seed_conversation(), duration=None, on_read=interrupt)
    assert len(reports) == 1 and run.capture_end is not None


# -- the terminal view -------------------------------------------------------------


def test_live_table_shows_probes_unanswered_and_due_times():
    conv = seed_conversation(t_rst=None)
    model = KeepaliveModel()
    for segment in conv.segments:
        if segment.t <= conv.t0 + 11.2:
            model.feed(segment)
    expectations = build_expectations(SEED_EXPECT)
    monitor = LiveMonitor(model, expectations)
    console = Console(record=True, width=140, color_system=None)
    console.print(live_table(model, monitor, conv.t0 + 11.2))
    text = console.export_text()
    server_row = next(line for line in text.splitlines() if line.strip().startswith("server"))
    assert "4 probes, 2/3 unanswered" in server_row  # 4 keepalive probes so far, 2 of the count of 3 unanswered
    assert "next probe" in server_row and "(in 1.9 s)" in server_row  # next probe at 13.098
    assert "abort expected" in server_row and "(in 3.9 s)" in server_row  # abort at 15.098
    assert "#1 MATCH so far  10.9.0.2:41000 -> 10.9.0.1:5432" in text and "open" in text
    assert not any(line.strip().startswith("client") for line in text.splitlines())  # nothing to show: no row


def test_live_view_without_connections_and_with_drops():
    model = KeepaliveModel()
    header = LiveHeader(title="t", interfaces=["br-x"], filter="tcp port 5432", started=100.0, packets=3, drops=7)
    console = Console(record=True, width=140, color_system=None)
    console.print(live_view(header, model, LiveMonitor(model, None), 112.0))
    text = console.export_text()
    assert "no Postgres connection seen yet" in text and "7 dropped by the kernel" in text and "12.0 s on br-x: 0 connection(s), 3 packets" in text


def test_live_view_caps_the_number_of_connections():
    model = KeepaliveModel()
    for i in range(30):
        conv = Conversation()
        conv.client.port = 40000 + i
        model.feed_all(conv.handshake(float(i)).segments)
    console = Console(record=True, width=140, color_system=None)
    console.print(live_table(model, LiveMonitor(model, None), Conversation().t0 + 40, max_rows=5))
    text = console.export_text()
    assert "26 more connection(s)" in text  # 4 one-line connections and the line that counts the rest
    assert "#30 " in text and "#1 " not in text  # equally quiet: the most recently active are shown


def test_terminal_mode_draws_the_table():
    _, _, text, _ = replay(seed_conversation(), terminal=True, duration=12.0)
    assert "MATCH so far" in text and "abort expected" in text


def test_alarm_line_has_the_raise_time():
    monitor_model = KeepaliveModel()
    conv = seed_conversation(t_rst=None)
    monitor_model.feed_all(conv.segments)
    monitor = LiveMonitor(monitor_model, build_expectations(SEED_EXPECT))
    [alarm] = monitor.alarms(conv.t0 + 13.2)
    assert alarm_line(alarm, conv.t0 + 13.2).split(" ALARM ")[0].endswith(".200")


# -- signals and the command -----------------------------------------------------------


def test_sigterm_sets_the_stop_event():
    stop = threading.Event()
    called = []
    restore = install_stop_handlers(stop, lambda: called.append(1))
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 2
        while not stop.is_set() and time.time() < deadline:
            time.sleep(0.01)
    finally:
        restore()
    assert stop.is_set() and called == [1]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("argv, words", [
    (["watch", "--interface", "lo", "--container", "x"], "only one of"),
    (["watch", "--interface", "no-such-if0"], "no such network interface"),
    (["watch", "--interface", "lo", "--full-packets"], "--full-packets only makes sense with --write"),
    (["watch", "--interface", "lo", "--expect", "tcp_keepalives_idle=banana"], "tcp_keepalives_idle"),
])
def test_watch_usage_errors_are_one_line_exit_2(argv, words):
    if os.geteuid() != 0 and "only one" not in words:
        pytest.skip("as non-root the root check answers first")
    done = subprocess.run([sys.executable, "-m", "kaobs", *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    err = done.stderr
    assert err.count("\n") == 1 and err.startswith("kaobs: error:") and words in err, err


def test_watch_needs_root_says_so_in_one_line():
    if os.geteuid() == 0:
        code = ("import os; os.geteuid = lambda: 1000; import sys; from kaobs.cli import run; "
                "sys.exit(run(['watch', '--interface', 'lo', '--duration', '1']))")
    else:
        code = "import sys; from kaobs.cli import run; sys.exit(run(['watch', '--interface', 'lo', '--duration', '1']))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "needs root" in done.stderr and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_json_output_contract_on_replay(capsys):
    from kaobs.report import to_json

    run, reports, _, _ = replay(seed_conversation(), output_format="json")
    doc = json.loads(json.dumps(to_json(run, reports, build_expectations(SEED_EXPECT))))
    assert doc["summary"] == {"connections": 1, "match": 1, "mismatch": 0, "unverified": 0, "no_keepalive": 0}
    assert doc["input"]["sources"] == ["live:fake0"]


# -- privileged: the real command on a namespace of our own --------------------------------

NETNS_EXPECT = ["--expect", "tcp_keepalives_idle=1", "--expect", "tcp_keepalives_interval=1",
                "--expect", "tcp_keepalives_count=2"]


def kaobs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kaobs", *args]


def wait_for_line(stream, needle: str, limit: float) -> str:
    """Read lines from a subprocess pipe until one contains `needle` (bounded by `limit` seconds)."""
    found: list[str] = []

    def reader():
        for line in stream:
            found.append(line)
            if needle in line:
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(limit)
    assert found and needle in found[-1], f"no {needle!r} within {limit} s: {found}"
    return "".join(found)


def server_probes(doc: dict) -> list[tuple[int, str, bool | None]]:
    [conn] = doc["connections"]
    return [(p["frame"], p["kind"], p["answered"]) for p in conn["sides"]["server"]["probes"]]


def pcap_records(path: str) -> list[tuple[int, int, bytes]]:
    """(caplen, wirelen, data) of every record of a classic pcap file, checked for consistency."""
    import struct

    with open(path, "rb") as f:
        data = f.read()
    magic = data[:4]
    assert magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"), magic  # little-endian pcap, us or ns
    _, _, _, _, snaplen, linktype = struct.unpack_from("<HHiIII", data, 4)
    records, pos = [], 24
    while pos < len(data):
        assert pos + 16 <= len(data), "record header cut short"
        _, _, caplen, wirelen = struct.unpack_from("<IIII", data, pos)
        assert caplen <= wirelen and pos + 16 + caplen <= len(data), "record cut short"
        records.append((caplen, wirelen, data[pos + 16:pos + 16 + caplen]))
        pos += 16 + caplen
    assert linktype == 1
    return records


def assert_headers_only(path: str) -> int:
    from sniffer.dissect import frame_header_end

    records = pcap_records(path)
    for caplen, wirelen, frame in records:
        end = frame_header_end(1, frame)
        assert end is not None and caplen == end, (caplen, wirelen, end)
    with open(path, "rb") as f:
        raw = f.read()
    assert b"hello" not in raw  # the client's payload
    return len(records)


@pytest.mark.privileged
def test_watch_json_reports_the_probes_and_its_pcap_says_the_same(tmp_path):
    from tests.test_live import netns_peer, vanishing_client_scenario

    pcap = str(tmp_path / "watch.pcap")
    page = tmp_path / "watch.html"
    with netns_peer() as peer:
        watch = subprocess.Popen(
            kaobs_cmd("watch", "--interface", peer.host_if, "--duration", "9", "--format", "json", "--write", pcap,
                      "--html", str(page), *NETNS_EXPECT),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(2.0)  # json mode is silent: give the capture time to open
            scenario = vanishing_client_scenario(peer)
            out, err = watch.communicate(timeout=30)
        finally:
            watch.kill()
            watch.wait(timeout=10)
    assert scenario["outcome"] == "Connection timed out"
    assert watch.returncode == 0, err
    doc = json.loads(out)
    [conn] = doc["connections"]
    server = conn["sides"]["server"]
    assert conn["verdict"] == "match" and conn["end_reason"] == "keepalive_abort"
    assert server["abort"]["reason"] == "keepalive_count"
    assert server["observed"]["count"] == 2
    assert server["observed"]["interval"] == pytest.approx(1.0, abs=0.1)
    assert [p["answered"] for p in server["probes"]][-2:] == [False, False]
    assert doc["input"]["sources"] == [f"live:{peer.host_if}"]
    assert doc["input"]["end"] - doc["input"]["start"] == pytest.approx(9.0, abs=0.5)
    # --html: the run's page, at its end (what it draws is tests/test_html_report.py's business)
    html = page.read_text()
    assert f'data-connection="{conn["id"]}" data-verdict="match" data-probes="{server["keepalive_probes"]}"' in html
    assert f"kaobs: timelines written to {page} (1 connection(s) drawn" in err
    # the capture file, analysed offline, gives the same probes (frame numbers included) and verdict
    packets = assert_headers_only(pcap)
    assert packets == doc["input"]["packets"]
    again = subprocess.run(kaobs_cmd("analyze", pcap, "--format", "json", *NETNS_EXPECT),
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    offline = json.loads(again.stdout)
    assert server_probes(offline) == server_probes(doc)
    assert offline["connections"][0]["verdict"] == "match"
    offline_abort = offline["connections"][0]["sides"]["server"]["abort"]
    assert offline_abort["reason"] == server["abort"]["reason"]
    assert offline_abort["t"] == pytest.approx(server["abort"]["t"], abs=1e-6)  # the pcap keeps microseconds


@pytest.mark.privileged
def test_watch_lines_alarm_and_sigterm_give_the_final_report_and_a_valid_pcap(tmp_path):
    """Non-tty output: one line per event; the peer-silent alarm; SIGTERM ends it with the report."""
    from tests.test_live import netns_peer, vanishing_client_scenario

    pcap = str(tmp_path / "term.pcap")
    with netns_peer() as peer:
        watch = subprocess.Popen(
            kaobs_cmd("watch", "--interface", peer.host_if, "--write", pcap, *NETNS_EXPECT),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            head = wait_for_line(watch.stdout, "watching", 20)
            assert "until Ctrl-C" in head
            vanishing_client_scenario(peer)
            time.sleep(0.5)
            t_term = time.time()
            watch.send_signal(signal.SIGTERM)
            rest, err = watch.communicate(timeout=15)
            ended_in = time.time() - t_term
        finally:
            watch.kill()
            watch.wait(timeout=10)
    assert watch.returncode == 0, err
    assert ended_in < 3
    lines = rest.splitlines()
    assert any("new connection" in line for line in lines)
    assert sum("server keepalive probe" in line for line in lines) >= 3
    assert any("client answered server probe 1 " in line for line in lines)
    [alarm] = [line for line in lines if " ALARM " in line]
    assert "2 of 2 probes unanswered" in alarm
    abort = next(i for i, line in enumerate(lines) if "server ABORT (RST) after 2 unanswered" in line)
    assert lines.index(alarm) < abort
    assert any(line.startswith("#1 ") and "MATCH" in line for line in lines[abort:])  # the final report
    assert "1 connection(s): 1 match" in rest
    assert f"capture written to {pcap} (headers only)" in rest
    assert_headers_only(pcap)
    offline = subprocess.run(kaobs_cmd("analyze", pcap, *NETNS_EXPECT), capture_output=True, text=True, timeout=60)
    assert offline.returncode == 0 and "1 connection(s): 1 match" in offline.stdout


@pytest.mark.privileged
def test_ctrl_c_on_an_idle_interface_ends_with_a_report_and_a_valid_empty_pcap(tmp_path):
    from tests.test_live import netns_peer

    pcap = str(tmp_path / "idle.pcap")
    with netns_peer() as peer:
        watch = subprocess.Popen(kaobs_cmd("watch", "--interface", peer.host_if, "--write", pcap),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_line(watch.stdout, "watching", 20)
            watch.send_signal(signal.SIGINT)
            rest, err = watch.communicate(timeout=15)
        finally:
            watch.kill()
            watch.wait(timeout=10)
    assert watch.returncode == 0, err
    assert "Traceback" not in err
    assert f"No Postgres connection in live:{peer.host_if}" in rest
    assert pcap_records(pcap) == []  # a file header and nothing else: still a valid pcap
    again = subprocess.run(kaobs_cmd("analyze", pcap), capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "No Postgres connection" in again.stdout


@pytest.mark.privileged
def test_watch_nice_raises_its_own_priority():
    """--nice -7: the running watcher is at priority -7 (what a saturated machine needs, see README)."""
    proc = subprocess.Popen([sys.executable, "-m", "kaobs", "watch", "-i", "lo", "--duration", "3", "--nice", "-7",
                             "--format", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 2.5
        seen = None
        while time.monotonic() < deadline and proc.poll() is None:
            seen = os.getpriority(os.PRIO_PROCESS, proc.pid)
            if seen == -7:
                break
            time.sleep(0.05)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert seen == -7, err
    assert proc.returncode == 0, err
    assert json.loads(out)["input"]["sources"] == ["live:lo"]


def test_watch_nice_out_of_range_is_one_line():
    from kaobs.cli import run

    with pytest.raises(SystemExit) as exit_:
        run(["watch", "-i", "lo", "--nice", "-40"])
    assert exit_.value.code == 2
