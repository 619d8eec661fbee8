"""`--metrics`: the Prometheus metrics of a live run, on conversations built in code replayed through `run_live`.

Every number is checked against the final report of the same run (what
`kaobs watch --format json` prints), the labels against what they may be
(never a client's port), the exposition against `promtool check metrics`
(Debian's prometheus package, as Prometheus itself parses it), and the
HTTP server against a real scrape. tests/test_prometheus.py scrapes a lab
run with a real Prometheus.
"""
from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from analysis.expect import build_expectations
from analysis.model import KEEPALIVE
from analysis.pipeline import tally
from kaobs.episode import idle_before_death
from kaobs.metrics import (KEEPALIVE_BUCKETS, ListenAddress, MetricsError, MetricsServer, WatchMetrics,
                           parse_listen_address)
from kaobs.watch import run_live
from tests.builders import Conversation, Peer
from tests.test_model import SEED_EXPECT, seed_conversation
from tests.test_watch import FakeClock, ReplayCapture

SERVER_A = "10.9.0.1:5432"
SERVER_B = "10.9.0.5:5432"


def mixed() -> list[Conversation]:
    """Connections of every kind the metrics count, on two servers, judged against the seed's settings."""
    seed = seed_conversation()  # 5 probes, 2 answered, the server's abort: match
    lost = Conversation(client=Peer("10.9.0.2", 41001, 7000)).handshake().exchange(0.01)
    lost.probe("server", 3.02).answer("client", 3.021)  # an answer the server never got
    lost.probe("server", 5.04).probe("server", 7.06).rst("server", 9.08)
    cut = Conversation(client=Peer("10.9.0.3", 41002, 9000), server=Peer("10.9.0.5", 5432, 500000))
    cut.server.ttl = 63
    cut.handshake().exchange(0.01)
    cut.data("client", 12.0, 20).rst_from_path("server", 12.0001, ttl=64)  # a middlebox's RST after 12 s idle
    window = Conversation(client=Peer("10.9.0.2", 41003, 3000)).handshake().data("client", 0.01)
    window.data("server", 0.02, 60000)
    window.set_window("client", 0).ack("client", 0.05)
    for t in (0.61, 1.07, 1.93, 3.66, 7.21):
        window.probe("server", t).answer("client", t + 0.0001)
    late = Conversation(client=Peer("10.9.0.4", 41004, 4000)).handshake().exchange(0.01)
    late.probe("server", 6.02).answer("client", 6.021)  # idle 6 s where 3 s is expected: still open at the end
    return [seed, lost, cut, window, late]


def replay_metrics(conversations, expect=SEED_EXPECT, duration=25.0, hide=None):
    segments = sorted((s for c in conversations for s in c.segments), key=lambda s: s.t)
    clock = FakeClock(segments[0].t - 0.5)
    capture = ReplayCapture(segments, clock)
    expectations = build_expectations(expect)
    metrics = WatchMetrics(expectations, process=False)
    judged = []

    def on_judged(report):
        judged.append(report)
        metrics.on_judged(report)

    run, reports = run_live(capture, expectations=expectations, ports=(5432,), hz=250, output_format="json",
                            duration=duration, stop=threading.Event(), console=Console(file=io.StringIO()),
                            err=Console(file=io.StringIO()), clock=clock, hide=hide, metrics=metrics,
                            on_judged=on_judged)
    assert [r.connection.index for r in judged] == [r.connection.index for r in reports]  # each once
    return metrics, run, reports


def value(metrics: WatchMetrics, name: str, **labels) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def per_server(reports, server):
    return [r for r in reports if r.connection.server.endpoint == server]


@pytest.fixture(scope="module")
def mixed_run():
    return replay_metrics(mixed())


def test_probe_counters_live_from_the_wire_equal_the_final_report(mixed_run):
    metrics, _, reports = mixed_run
    assert len(reports) == 5
    for server in (SERVER_A, SERVER_B):
        for role in ("server", "client"):
            sides = [r.side(role) for r in per_server(reports, server)]
            assert value(metrics, "kaobs_keepalive_probes_total", side=role, server=server) == sum(
                s.keepalive_probe_count for s in sides)
            answered = value(metrics, "kaobs_keepalive_probe_answers_total", side=role, server=server)
            lost = value(metrics, "kaobs_keepalive_probe_answers_lost_total", side=role, server=server)
            assert lost == sum(len(s.lost_answers) for s in sides)
            assert answered - lost == sum(s.answered for s in sides)
            assert value(metrics, "kaobs_zero_window_probes_total", side=role, server=server) == sum(
                s.window_probe_count for s in sides)
    # the numbers themselves: seed 5 + lost 3 + late 1 keepalive probes, the window probes not among them
    assert value(metrics, "kaobs_keepalive_probes_total", side="server", server=SERVER_A) == 9
    assert value(metrics, "kaobs_keepalive_probe_answers_total", side="server", server=SERVER_A) == 4
    assert value(metrics, "kaobs_keepalive_probe_answers_lost_total", side="server", server=SERVER_A) == 1
    assert value(metrics, "kaobs_zero_window_probes_total", side="server", server=SERVER_A) == 5


def test_verdicts_aborts_mismatches_cuts_and_stalls_equal_the_final_report(mixed_run):
    metrics, _, reports = mixed_run
    for server in (SERVER_A, SERVER_B):
        mine = per_server(reports, server)
        for verdict, count in tally(mine).items():
            assert value(metrics, "kaobs_connections_total", server=server, verdict=verdict) == count
        for role in ("server", "client"):
            for reason in ("keepalive_count", "user_timeout"):
                assert value(metrics, "kaobs_keepalive_aborts_total", side=role, server=server, reason=reason) == sum(
                    1 for r in mine if r.side(role).abort is not None and r.side(role).abort.reason == reason)
            settings = {f.setting for r in mine for f in r.side(role).findings}
            for setting in settings:
                assert value(metrics, "kaobs_setting_mismatches_total", side=role, server=server,
                             setting=setting) == sum(1 for r in mine for f in r.side(role).findings
                                                     if f.setting == setting and f.status == "mismatch")
            for stall in (s for r in mine for s in r.side(role).stalls):
                assert value(metrics, "kaobs_stalls_total", side=role, server=server, kind=stall.kind,
                             outcome=stall.outcome) >= 1
        for kind in ("reset", "drop"):
            assert value(metrics, "kaobs_path_cuts_total", server=server, kind=kind) == sum(
                1 for r in mine if r.path_cut is not None and r.path_cut.kind == kind)
    assert value(metrics, "kaobs_connections_total", server=SERVER_A, verdict="match") == 2
    assert value(metrics, "kaobs_connections_total", server=SERVER_A, verdict="mismatch") == 1
    assert value(metrics, "kaobs_connections_total", server=SERVER_A, verdict="no_keepalive") == 1  # window probes
    assert value(metrics, "kaobs_connections_total", server=SERVER_B, verdict="no_keepalive") == 1
    assert value(metrics, "kaobs_keepalive_aborts_total", side="server", server=SERVER_A, reason="keepalive_count") == 2
    assert value(metrics, "kaobs_setting_mismatches_total", side="server", server=SERVER_A,
                 setting="tcp_keepalives_idle") == 1
    assert value(metrics, "kaobs_path_cuts_total", server=SERVER_B, kind="reset") == 1
    # the server host answered on the seed's connection while these went unanswered: the path dropped them
    assert value(metrics, "kaobs_path_cuts_total", server=SERVER_A, kind="drop") == 2
    assert value(metrics, "kaobs_stalls_total", side="server", server=SERVER_A, kind="window", outcome="gave_up") == 1


def test_histograms_hold_the_observed_idle_interval_and_idle_before_death(mixed_run):
    metrics, _, reports = mixed_run
    for server in (SERVER_A, SERVER_B):
        probes = [p for r in per_server(reports, server) for p in r.connection.server.probes if p.kind == KEEPALIVE]
        firsts = [p.t - p.since_accepted for p in probes if p.series_index == 1 and p.since_accepted is not None]
        assert value(metrics, "kaobs_keepalive_idle_seconds_count", side="server", server=server) == len(firsts)
        assert value(metrics, "kaobs_keepalive_idle_seconds_sum", side="server", server=server) == pytest.approx(
            sum(firsts))
    # Seen on the wire: seed's 3 series start 3.012, 3.021, 3.007 s after the last packet; lost's 3.008 s, then
    # 2.019 s (its answer crossed the capture point, so the wire sees a new series); late's 6.008 s.
    assert value(metrics, "kaobs_keepalive_idle_seconds_bucket", side="server", server=SERVER_A, le="2.0") == 0
    assert value(metrics, "kaobs_keepalive_idle_seconds_bucket", side="server", server=SERVER_A, le="3.0") == 1
    assert value(metrics, "kaobs_keepalive_idle_seconds_bucket", side="server", server=SERVER_A, le="5.0") == 5
    assert value(metrics, "kaobs_keepalive_idle_seconds_bucket", side="server", server=SERVER_A, le="10.0") == 6
    # gaps of ~2.02 s between unanswered probes: seed's 2, lost's 1
    assert value(metrics, "kaobs_keepalive_interval_seconds_count", side="server", server=SERVER_A) == 3
    assert value(metrics, "kaobs_keepalive_interval_seconds_bucket", side="server", server=SERVER_A, le="2.0") == 0
    assert value(metrics, "kaobs_keepalive_interval_seconds_bucket", side="server", server=SERVER_A, le="3.0") == 3
    deaths = {}
    for report in reports:
        death = idle_before_death(report)
        if death is not None:
            deaths.setdefault((report.connection.server.endpoint, death[0].replace(" ", "_")), []).append(death[1])
    assert {(SERVER_A, "keepalive_abort"), (SERVER_B, "path_reset")} <= set(deaths)
    for (server, cause), idles in deaths.items():
        assert value(metrics, "kaobs_idle_before_death_seconds_count", server=server, cause=cause) == len(idles)
    assert value(metrics, "kaobs_idle_before_death_seconds_bucket", server=SERVER_B, cause="path_reset",
                 le="10.0") == 0
    assert value(metrics, "kaobs_idle_before_death_seconds_bucket", server=SERVER_B, cause="path_reset",
                 le="20.0") == 1


def test_capture_counters_open_connections_and_the_settings_in_force(mixed_run):
    metrics, run, reports = mixed_run
    assert value(metrics, "kaobs_captured_packets_total") == run.packets > 0
    assert value(metrics, "kaobs_captured_tcp_segments_total") == run.segments
    assert value(metrics, "kaobs_kernel_drops_total") == 0
    assert value(metrics, "kaobs_connections_opened_total", server=SERVER_A) == 4
    open_now = [r for r in reports if r.connection.end_reason == "open"]
    assert value(metrics, "kaobs_connections_open", server=SERVER_A) == len(open_now) == 2  # late, window
    assert value(metrics, "kaobs_connections_open", server=SERVER_B) == 0
    assert value(metrics, "kaobs_setting_info", side="server", setting="tcp_keepalives_idle", value="3 s",
                 source="--expect") == 1
    assert value(metrics, "kaobs_setting_info", side="server", setting="tcp_keepalives_count", value="3",
                 source="--expect") == 1


def test_no_label_names_a_client():
    metrics, _, reports = replay_metrics(mixed())
    text = generate_latest(metrics.registry).decode()
    for report in reports:
        client = report.connection.client
        assert f":{client.port}" not in text and client.address not in text
    names = {label for family in text_string_to_metric_families(text) for sample in family.samples
             for label in sample.labels}
    assert names <= {"side", "server", "reason", "kind", "outcome", "verdict", "setting", "cause", "value",
                     "source", "le"}


def test_hidden_connections_are_not_counted():
    """kaobs's own --dsn session is neither reported nor counted."""
    seed = seed_conversation()
    own = Conversation(client=Peer("10.9.0.7", 50000, 1000)).handshake(0).exchange(0.01)
    own.probe("server", 3.05).answer("client", 3.0501)
    metrics, _, reports = replay_metrics([seed, own], hide=lambda conn: conn.client.port == 50000, duration=17.0)
    assert len(reports) == 1
    assert value(metrics, "kaobs_keepalive_probes_total", side="server", server=SERVER_A) == 5
    assert value(metrics, "kaobs_connections_opened_total", server=SERVER_A) == 1
    assert sum(value(metrics, "kaobs_connections_total", server=SERVER_A, verdict=v)
               for v in ("match", "mismatch", "unverified", "no_keepalive")) == 1


def test_buckets_span_keepalive_scales_and_the_middlebox_cuts():
    for seconds in (1, 75, 240, 350, 600, 900, 1200, 7200):
        assert seconds in KEEPALIVE_BUCKETS
    assert KEEPALIVE_BUCKETS[-1] == float("inf") and list(KEEPALIVE_BUCKETS) == sorted(KEEPALIVE_BUCKETS)


@pytest.mark.skipif(shutil.which("promtool") is None and not __import__("os").environ.get("CI"),
                    reason="promtool not installed (apt-get install prometheus; scripts/setup.sh does)")
def test_the_exposition_passes_promtool(tmp_path):
    metrics, _, _ = replay_metrics(mixed())
    metrics_text = generate_latest(metrics.registry)
    checked = subprocess.run(["promtool", "check", "metrics"], input=metrics_text, capture_output=True, timeout=60)
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
    assert not checked.stdout.strip() and not checked.stderr.strip()  # no lint complaint either


# -- the address and the HTTP server ---------------------------------------------------------


@pytest.mark.parametrize("text, host, port", [(":9432", "", 9432), ("127.0.0.1:9432", "127.0.0.1", 9432),
                                              ("[::1]:0", "::1", 0), ("localhost:80", "localhost", 80)])
def test_listen_addresses(text, host, port):
    assert parse_listen_address(text) == ListenAddress(host, port)


@pytest.mark.parametrize("text", ["9432", "::1:9432", "[x]:1", "host:", "host:65536", "host:-1", "[::1]9432"])
def test_bad_listen_addresses_are_refused(text):
    with pytest.raises(ValueError):
        parse_listen_address(text)


@pytest.mark.parametrize("command", ["watch", "lab"])
def test_a_bad_metrics_address_is_one_line_and_exit_2(command):
    done = subprocess.run([sys.executable, "-m", "kaobs", command, "--metrics", "nowhere"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "kaobs: error: Invalid value for '--metrics': 'nowhere': expected HOST:PORT or :PORT "
        "(e.g. :9432 or 127.0.0.1:9432)"]


def scrape(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.headers["Content-Type"], response.read().decode()


def test_the_server_serves_the_exposition_and_lingers_for_a_scrape_of_the_final_numbers():
    metrics, _, _ = replay_metrics([seed_conversation()], duration=17.0)
    server = MetricsServer(metrics.registry, ListenAddress("127.0.0.1", 0)).start()
    port = server.port
    try:
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        kind, text = scrape(server.url)
        assert kind.startswith("text/plain") and "version=0.0.4" in kind
        assert 'kaobs_keepalive_probes_total{server="10.9.0.1:5432",side="server"} 5.0' in text
        assert server.linger(0.2) is False  # that scrape came before the numbers were final
        server.final()
        threading.Timer(0.3, scrape, (server.url,)).start()
        assert server.linger(10) is True
    finally:
        server.close()
    with socket.socket() as again:  # closed: nothing listens there any more (its scrapes' TIME_WAITs aside)
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
        again.listen()


def test_a_port_in_use_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsError) as error:
            MetricsServer(WatchMetrics(process=False).registry, ListenAddress("127.0.0.1", port)).start()
    assert str(error.value) == f"--metrics 127.0.0.1:{port}: cannot listen: Address already in use"


def test_every_address_serves_ipv4_and_ipv6():
    server = MetricsServer(WatchMetrics().registry, ListenAddress("", 0)).start()
    try:
        assert "process_resident_memory_bytes" in scrape(f"http://127.0.0.1:{server.port}/metrics")[1]
        if socket.has_ipv6 and server._httpd.address_family == socket.AF_INET6:
            assert "kaobs_captured_packets_total" in scrape(f"http://[::1]:{server.port}/metrics")[1]
    finally:
        server.close()


# -- privileged: the real command, scraped over HTTP ---------------------------------------------


def metric_values(text: str) -> dict[tuple[str, frozenset], float]:
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def summed(values: dict, name: str, **labels) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in values.items() if n == name and wanted <= ls)


@pytest.mark.privileged
def test_watch_metrics_port_0_scraped_while_it_runs_and_after_it_ends_equal_its_json():
    """`kaobs watch --metrics 127.0.0.1:0 --metrics-linger`: the last scrape holds the JSON report's numbers."""
    from tests.test_live import netns_peer, vanishing_client_scenario
    from tests.test_watch import NETNS_EXPECT, kaobs_cmd, wait_for_line

    with netns_peer() as peer:
        watch = subprocess.Popen(
            kaobs_cmd("watch", "--interface", peer.host_if, "--duration", "9", "--format", "json",
                      "--metrics", "127.0.0.1:0", "--metrics-linger", "20", *NETNS_EXPECT),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            said = wait_for_line(watch.stderr, "kaobs: metrics on http://127.0.0.1:", 20)
            url = said.split("metrics on ", 1)[1].split()[0]
            scrapes: list[str] = []

            def scraper():
                deadline = time.monotonic() + 40
                while watch.poll() is None and time.monotonic() < deadline:
                    try:
                        scrapes.append(scrape(url)[1])
                    except OSError:
                        pass  # the server has closed: the run is over
                    time.sleep(0.5)

            scraping = threading.Thread(target=scraper, daemon=True)
            scraping.start()
            time.sleep(1.0)
            scenario = vanishing_client_scenario(peer)
            out, err = watch.communicate(timeout=45)
            scraping.join(10)
        finally:
            watch.kill()
            watch.wait(timeout=10)
    assert scenario["outcome"] == "Connection timed out"
    assert watch.returncode == 0, err
    assert "no scrape came" not in err
    doc = json.loads(out)
    [conn] = doc["connections"]
    server = conn["sides"]["server"]
    assert server["abort"]["reason"] == "keepalive_count" and server["keepalive_probes"] >= 2
    during = [metric_values(text) for text in scrapes]
    assert len(during) >= 5
    final = during[-1]
    assert summed(final, "kaobs_keepalive_probes_total", side="server") == server["keepalive_probes"]
    assert (summed(final, "kaobs_keepalive_probe_answers_total", side="server")
            - summed(final, "kaobs_keepalive_probe_answers_lost_total", side="server")) == server["answered_probes"]
    assert summed(final, "kaobs_keepalive_aborts_total", side="server", reason="keepalive_count") == 1
    assert summed(final, "kaobs_connections_total", verdict=conn["verdict"]) == 1
    assert summed(final, "kaobs_captured_packets_total") == doc["input"]["packets"]
    # live: probes were counted while the run went on, before any verdict
    probing = [v for v in during if summed(v, "kaobs_keepalive_probes_total") > 0]
    assert probing and summed(probing[0], "kaobs_connections_total") == 0


@pytest.mark.privileged
def test_watch_metrics_on_a_port_in_use_is_one_line_and_exit_2_before_any_capture():
    from tests.test_watch import kaobs_cmd

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(kaobs_cmd("watch", "--interface", "lo", "--duration", "30", "--metrics",
                                        f"127.0.0.1:{port}"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"kaobs: error: --metrics 127.0.0.1:{port}: cannot listen: Address already in use"]


def readme_queries() -> list[str]:
    """The PromQL of the README's Grafana table (its second column, in backquotes)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("### Metrics\n", 1)[1].split("\n## ", 1)[0]
    queries = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if len(cells) == 2 and cells[1].startswith("`") and cells[0] not in ("panel", "---"):
            queries.append(cells[1].split("` (and")[0].strip("`"))
    return queries


@pytest.mark.skipif(shutil.which("promtool") is None and not __import__("os").environ.get("CI"),
                    reason="promtool not installed (apt-get install prometheus; scripts/setup.sh does)")
def test_the_readme_queries_parse_and_name_metrics_that_exist(tmp_path):
    import re

    queries = readme_queries()
    assert len(queries) >= 10
    rules = tmp_path / "rules.yml"
    rules.write_text("groups:\n  - name: readme\n    rules:\n" + "".join(
        f"      - record: readme:query{i}\n        expr: '{q}'\n" for i, q in enumerate(queries)))
    checked = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    metrics, _, _ = replay_metrics(mixed())
    names = {sample.name for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
             for sample in family.samples}
    for query in queries:
        for name in re.findall(r"\bkaobs_\w+", query):
            assert name in names, (name, query)
