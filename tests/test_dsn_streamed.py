"""`kaobs analyze --dsn` writes its report without holding the reports, and says what the held way said.

Before issue 12 the reports of an `analyze --dsn` were all held in memory so
that connections could be matched to backends, notes written per session
and checks made after aborts. Now the spool keeps ended connections on disk
and two passes do it (`Postgres.prepare`, `Postgres.annotate`). A capture
built here (connections named after backends, a session with its own idle
among others agreeing with the server-wide one, an abort whose backend
outlived it, ports reused, many short quiet connections) goes through the
real CLI with a fake server reading; the result must be what the pure
functions give on all the reports held at once, as before.
"""
from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

import kaobs.cli as cli
import kaobs.postgres as pgmod
from analysis.expect import Expectations, build_expectations
from analysis.pgsessions import PostgresView, abort_checks, match_connections, session_notes, staleness_warning
from analysis.pgsettings import server_expectation
from analysis.pipeline import Analysis
from kaobs.report import TextOptions, render_text, to_json
from kaobs.spool import ConnectionSpool
from sniffer.pcapfile import CaptureReader
from tests.builders import Conversation, Peer
from tests.pcap_builders import LINKTYPE_ETHERNET, Record, Tcp, frame_for, pcap
from tests.test_pgmeta import SERVER_IP, T0, backend, readings, server_info


def capture(path) -> None:
    conversations = []
    wide = Conversation(client=Peer("10.9.0.2", 41000, 1000), server=Peer(SERVER_IP, 5432, 900000), t0=T0)
    wide.handshake(0).exchange(0.1).probe("server", 7.11).answer("client", 7.111)
    own = Conversation(client=Peer("10.9.0.2", 41001, 5000), server=Peer(SERVER_IP, 5432, 800000), t0=T0)
    own.handshake(0.01).exchange(0.1).probe("server", 1.11).answer("client", 1.111)
    dead = Conversation(client=Peer("10.9.0.3", 41002, 7000), server=Peer(SERVER_IP, 5432, 700000), t0=T0)
    dead.handshake(0.02).exchange(0.1).probe("server", 7.11).probe("server", 8.12).rst("server", 9.13)
    conversations += [wide, own, dead]
    for i in range(200):  # short quiet connections, some on a port a backend has now (reused since)
        quiet = Conversation(client=Peer("10.9.0.4", 42000 + i % 150, 100 + i), server=Peer(SERVER_IP, 5432, 9000 + i),
                             t0=T0)
        start = 0.5 + 0.2 * i
        quiet.handshake(start).exchange(start + 0.01).fin("client", start + 0.02).fin("server", start + 0.021)
        quiet.ack("client", start + 0.022)
        conversations.append(quiet)
    segments = sorted((s for c in conversations for s in c.segments), key=lambda s: s.t)
    records = [Record(int(s.t * 1e9), frame_for(LINKTYPE_ETHERNET, Tcp(
        s.src, s.dst, s.sport, s.dport, s.seq, s.ack, s.flags, s.window, b"x" * s.payload_len, ident=s.ip_id,
        ttl=s.ttl))) for s in segments]
    path.write_bytes(pcap(records, LINKTYPE_ETHERNET, nsec=True))


BACKENDS = [backend(11, 41000), backend(12, 41001), backend(13, 41002, address="10.9.0.3", state="active"),
            backend(14, 42003, address="10.9.0.4", start=T0 + 100), backend(15, 42004, address="10.9.0.4")]


def expectations() -> Expectations:
    side, _, _ = server_expectation(readings(idle=7, interval=1, count=2, user_timeout=0, session=(7, 1, 2, 0)),
                                    build_expectations().server)
    return Expectations(side, build_expectations().client)


def fake_read(dsn, expectations_, sysctls=(), container=None, **_):
    view = PostgresView(dsn="host=db", server=server_info(read_at=T0 + 20), backends=list(BACKENDS))
    return pgmod.Postgres(dsn, expectations(), view, backends=list(BACKENDS))


def held_view(path) -> tuple[list, PostgresView]:
    """The reports and the view as `analyze --dsn` made them before: all reports held, the pure functions on them."""
    analysis = Analysis((5432,))
    reader = CaptureReader(str(path))
    analysis.feed(reader.records())
    analysis.finish()
    exp = expectations()
    reports = list(analysis.reports(exp))
    view = PostgresView(dsn="host=db", server=server_info(read_at=T0 + 20), backends=list(BACKENDS))
    stale = staleness_warning(max(r.connection.end for r in reports), view.server.read_at)
    if stale is not None:
        view.warnings.append(stale)
    view.connections = match_connections([r.connection for r in reports], BACKENDS, view.server)
    for index, notes in session_notes(reports, exp.server, view.connections).items():
        view.connections[index].notes.extend(notes)
    for index, check in abort_checks(reports, BACKENDS, view.server.read_at).items():
        view.connections[index].after_abort = check
    return reports, view


@pytest.fixture
def cli_run(monkeypatch, capsys):
    monkeypatch.setattr(pgmod.Postgres, "read", classmethod(lambda cls, *a, **k: fake_read(*a, **k)))
    spools: list[ConnectionSpool] = []

    class Counting(ConnectionSpool):
        def __init__(self) -> None:
            super().__init__()
            spools.append(self)

    monkeypatch.setattr(cli, "ConnectionSpool", Counting)

    def run(argv):
        capsys.readouterr()
        with pytest.raises(SystemExit) as done:
            cli.main.main(args=argv, standalone_mode=False)
        return done.value.code, capsys.readouterr().out, spools
    return run


def test_json_is_what_the_held_reports_gave(tmp_path, cli_run):
    path = tmp_path / "c.pcap"
    capture(path)
    code, out, spools = cli_run(["analyze", str(path), "--dsn", "host=db", "--format", "json"])
    [spool] = spools
    assert spool.count > 100  # the quiet connections went to disk: nothing held them
    reports, view = held_view(path)
    from analysis.pipeline import AnalysisRun
    run_doc = json.loads(out)
    wanted = to_json(AnalysisRun(sources=[]), reports, expectations(), view)
    assert run_doc["connections"] == json.loads(json.dumps(wanted["connections"]))
    assert run_doc["postgres"] == json.loads(json.dumps(wanted["postgres"]))
    by_port = {c["client"].rsplit(":", 1)[1]: c["postgres"] for c in run_doc["connections"]}
    assert by_port["41000"]["backend"]["pid"] == 11 and by_port["41001"]["session_notes"]
    assert by_port["41002"]["after_abort"]["status"] == "alive"
    assert run_doc["postgres"]["backends_outlived_abort"] == 1
    assert code == 1


def test_text_is_what_the_held_reports_gave(tmp_path, cli_run):
    path = tmp_path / "c.pcap"
    capture(path)
    code, out, spools = cli_run(["analyze", str(path), "--dsn", "host=db", "--all", "--color", "never"])
    [spool] = spools
    assert spool.count > 100 and code == 1
    reports, view = held_view(path)
    from analysis.pipeline import AnalysisRun
    buffer = io.StringIO()
    render_text(Console(file=buffer, highlight=False, soft_wrap=True, color_system=None, no_color=True),
                AnalysisRun(sources=[str(path)]), reports, expectations(), view, options=TextOptions(show_all=True))
    ours = [line for line in out.splitlines() if not line.startswith(("warning", "20", "capture"))]
    theirs = [line for line in buffer.getvalue().splitlines() if not line.startswith(("warning", "20", "capture"))]
    assert "outlived" in out and "per-session setting?" in out and "pid 11" in out
    assert ours[:-1] == theirs[:-1]  # the totals line also counts packets, which the pure run did not
