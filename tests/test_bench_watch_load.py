"""The load benchmark's pure parts: probe matching, tcpdump's counts, /proc stat, the verdict."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_watch_load.py")
_spec = importlib.util.spec_from_file_location("bench_watch_load", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bench_watch_load", bench)  # dataclasses look their module up there
_spec.loader.exec_module(bench)

ProbeSeen = bench.ProbeSeen


def _report(probes_t: list[float], abort_t: float | None = None, kind: str = "keepalive") -> dict:
    side = {"probes": [{"t": t, "kind": kind} for t in probes_t],
            "abort": None if abort_t is None else {"t": abort_t, "reason": "keepalive_count"}}
    return {"connections": [{"client": "10.0.0.3:40000", "server": "10.0.0.2:5432",
                             "sides": {"server": side, "client": {"probes": [], "abort": None}}}]}


def test_probes_of_takes_keepalive_probes_and_aborts_not_window_probes():
    seen = bench.probes_of(_report([1.0, 2.0], abort_t=5.0))
    assert [(p.side, p.kind, p.t) for p in seen] == [("server", "probe", 1.0), ("server", "probe", 2.0),
                                                      ("server", "abort", 5.0)]
    assert bench.probes_of(_report([1.0], kind="window")) == []


def test_a_probe_matches_within_5_ms_on_the_same_connection_side_and_kind():
    reference = [ProbeSeen("c:1", "s:5432", "server", 10.0), ProbeSeen("c:1", "s:5432", "server", 12.0),
                 ProbeSeen("c:1", "s:5432", "client", 13.0), ProbeSeen("c:1", "s:5432", "server", 14.0, "abort")]
    reported = [ProbeSeen("c:1", "s:5432", "server", 10.004),  # within 5 ms
                ProbeSeen("c:1", "s:5432", "server", 12.006),  # 6 ms off: no
                ProbeSeen("c:1", "s:5432", "server", 13.0),  # right time, wrong side
                ProbeSeen("c:2", "s:5432", "server", 14.0, "abort")]  # other connection
    missing, compared = bench.missing_from(reference, reported)
    assert compared == 4
    assert [p.t for p in missing] == [12.0, 13.0, 14.0]


def test_probes_outside_the_watch_window_are_not_compared():
    reference = [ProbeSeen("c:1", "s:5432", "server", t) for t in (1.0, 5.0, 9.0)]
    missing, compared = bench.missing_from(reference, [], start=2.0, end=8.0)
    assert compared == 1 and [p.t for p in missing] == [5.0]


def test_tcpdump_closing_counts():
    stderr = ("tcpdump: listening on br-1, link-type EN10MB (Ethernet), snapshot length 96 bytes\n"
              "1910140 packets captured\n1910140 packets received by filter\n317781 packets dropped by kernel\n")
    assert bench.parse_tcpdump_counts(stderr) == {"captured": 1910140, "received by filter": 1910140,
                                                  "dropped by kernel": 317781}
    assert bench.parse_tcpdump_counts("") == {}


def test_cpu_seconds_reads_utime_and_stime_after_a_command_name_with_spaces():
    fields = ["S"] + ["0"] * 10 + [str(3 * bench.CLK_TCK), str(bench.CLK_TCK)] + ["0"] * 30
    line = "1234 (kaobs (watch) x) " + " ".join(fields)
    assert bench.cpu_seconds(line) == pytest.approx(4.0)


def test_verdict_needs_no_drops_every_probe_low_cpu_and_something_compared():
    good = bench.Figures(kaobs_drops=0, cpu_load_percent=4.0, reference_probes=10)
    assert good.verdict() == (True, [])
    for figures, words in [
        (bench.Figures(kaobs_drops=3, cpu_load_percent=4.0, reference_probes=10), "3 kernel drops"),
        (bench.Figures(kaobs_drops=None, cpu_load_percent=4.0, reference_probes=10), "no kernel drop count"),
        (bench.Figures(kaobs_drops=0, cpu_load_percent=12.0, reference_probes=10), "12.0 % of a core"),
        (bench.Figures(kaobs_drops=0, cpu_load_percent=4.0, reference_probes=0), "nothing was compared"),
        (bench.Figures(kaobs_drops=0, cpu_load_percent=4.0, reference_probes=10,
                       missing=[ProbeSeen("c", "s", "server", 1.0)]), "1 probe(s)/abort(s) missing"),
    ]:
        ok, reasons = figures.verdict()
        assert not ok and any(words in r for r in reasons), reasons
    assert "| verdict" in bench.table(good) and "PASS" in bench.table(good)
