"""A real Prometheus scrapes `kaobs lab --metrics`: what it stored equals kaobs's final JSON report.

Debian's `prometheus` binary is started by the test (its own storage in a
temporary directory, a 1 s scrape interval, one static target: the lab's
metrics address), the seed experiment runs (server keepalives idle 3 s,
interval 2 s, count 3; the client vanishes after two answered probes), and
`--metrics-linger` keeps the metrics up after the run until Prometheus has
scraped the final numbers. The test then asks Prometheus' HTTP API, as a
Grafana panel would, for the probes, answers, aborts and verdicts, and
finds them equal to the JSON report. Every wait is bounded.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

pytestmark = pytest.mark.privileged

IMAGE = os.environ.get("KAOBS_LAB_IMAGE", "kaobs/postgres:15-local")
SEED = ["--tcp-keepalives-idle", "3", "--tcp-keepalives-interval", "2", "--tcp-keepalives-count", "3"]
LAB_TIMEOUT_S = 180
READY_TIMEOUT_S = 60
LINGER_S = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


class Prometheus:
    """Debian's prometheus, run by hand on a free loopback port with a scrape config of our own."""

    def __init__(self, workdir, target: str) -> None:
        binary = shutil.which("prometheus")
        assert binary, "the prometheus binary is missing: apt-get install prometheus (scripts/setup.sh does)"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: kaobs\n    static_configs:\n"
            f"      - targets: ['{target}']\n")
        self.log = open(workdir / "prometheus.log", "w+")
        self.process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_ready(self, limit: float) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"prometheus exited: {self.output()[-2000:]}"
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"prometheus not ready within {limit} s: {self.output()[-2000:]}")

    def query(self, promql: str) -> list[dict]:
        answer = get_json(f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}")
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def scalar(self, promql: str) -> float | None:
        result = self.query(promql)
        return None if not result else float(result[0]["value"][1])

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.log.close()


def last(metric: str, by: str = "") -> str:
    """The newest value of every series of `metric`, whatever came after (the target is gone once kaobs exits)."""
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping}(last_over_time({metric}[15m]))"


def first_rise(matrix: list[dict]) -> float | None:
    """The time of the first sample above 0 in any series of a range query's answer."""
    times = [float(t) for series in matrix for t, v in series["values"] if float(v) > 0]
    return min(times) if times else None


def test_prometheus_scrapes_a_lab_run_and_holds_the_final_reports_numbers(tmp_path):
    metrics_port = free_port()
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{metrics_port}")
    try:
        prometheus.wait_ready(READY_TIMEOUT_S)
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "kaobs", "lab", *SEED, "--metrics", f"127.0.0.1:{metrics_port}",
             "--metrics-linger", str(LINGER_S), "--format", "json"],
            capture_output=True, text=True, timeout=LAB_TIMEOUT_S, env=dict(os.environ, KAOBS_LAB_IMAGE=IMAGE))
        lab_seconds = time.monotonic() - started
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"kaobs: metrics on http://127.0.0.1:{metrics_port}/metrics" in done.stderr
        assert "no scrape came" not in done.stderr, "Prometheus never scraped the final numbers"
        report = json.loads(done.stdout)
        connections = report["connections"]
        server_side = [c["sides"]["server"] for c in connections]
        assert report["summary"]["match"] >= 1 and any(s["abort"] for s in server_side)

        # The lab lingered until a scrape after its final numbers was answered; give Prometheus a moment to
        # make that scrape queryable (bounded), then compare once.
        deadline = time.monotonic() + 15
        while prometheus.scalar(last("kaobs_connections_total")) != len(connections) and time.monotonic() < deadline:
            time.sleep(0.5)
        for side in ("server", "client"):
            sides = [c["sides"][side] for c in connections]
            probes = prometheus.scalar(last(f'kaobs_keepalive_probes_total{{side="{side}"}}'))
            assert probes == sum(s["keepalive_probes"] for s in sides), side
            answers = last(f'kaobs_keepalive_probe_answers_total{{side="{side}"}}')
            lost = last(f'kaobs_keepalive_probe_answers_lost_total{{side="{side}"}}')
            answered = prometheus.scalar(f"{answers} - {lost}")
            assert answered == sum(s["answered_probes"] for s in sides), side
            assert prometheus.scalar(last(f'kaobs_zero_window_probes_total{{side="{side}"}}')) == sum(
                s["window_probes"] for s in sides)
        aborts = {(r["metric"]["side"], r["metric"]["reason"]): float(r["value"][1])
                  for r in prometheus.query(last("kaobs_keepalive_aborts_total", "side, reason"))}
        expected_aborts: dict[tuple[str, str], float] = {}
        for conn in connections:
            for side, data in conn["sides"].items():
                if data["abort"]:
                    key = (side, data["abort"]["reason"])
                    expected_aborts[key] = expected_aborts.get(key, 0) + 1
        assert aborts == expected_aborts and expected_aborts == {("server", "keepalive_count"): 1.0}
        verdicts = {r["metric"]["verdict"]: float(r["value"][1])
                    for r in prometheus.query(last("kaobs_connections_total", "verdict"))}
        assert verdicts == {verdict: float(report["summary"][verdict]) for verdict in verdicts}
        assert set(verdicts) == {"match", "mismatch", "unverified", "no_keepalive"}
        # the settings in force, as a Grafana table would show them
        settings = {(r["metric"]["setting"], r["metric"]["value"])
                    for r in prometheus.query('last_over_time(kaobs_setting_info{side="server"}[15m])')}
        assert {("tcp_keepalives_idle", "3 s"), ("tcp_keepalives_interval", "2 s"),
                ("tcp_keepalives_count", "3")} <= settings
        # the idle before the abort's first unanswered probe: the 3 s idle, in the (3, 5] bucket
        assert prometheus.scalar(last('kaobs_idle_before_death_seconds_count{cause="keepalive_abort"}')) == 1
        # and the scrapes were live, not only the last one: probes were stored before any verdict was
        window = f"[{int(lab_seconds) + 60}s]"
        first_probe = first_rise(prometheus.query(f"kaobs_keepalive_probes_total{window}"))
        first_verdict = first_rise(prometheus.query(f"kaobs_connections_total{window}"))
        assert first_probe is not None and first_verdict is not None and first_probe < first_verdict
    finally:
        prometheus.stop()
