"""`kaobs analyze` as a user runs it: exit codes, one-line errors, the JSON contract."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SEED = Path(__file__).resolve().parents[1] / "captures" / "seed_idle3_int2_cnt3_dead_client.pcap"
SEED_EXPECT = ["--expect", "tcp_keepalives_idle=3", "--expect", "tcp_keepalives_interval=2", "--expect", "tcp_keepalives_count=3"]


def kaobs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kaobs", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def seed() -> str:
    if not SEED.exists():
        pytest.fail(f"the seed capture is missing: {SEED}")
    return str(SEED)


def assert_one_line_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("kaobs: error: ")
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in lines[0]


def test_seed_matches_its_settings(seed):
    done = kaobs("analyze", seed, *SEED_EXPECT)
    assert done.returncode == 0, done.stderr
    assert "MATCH" in done.stdout
    assert "ABORT (RST) after 3 unanswered probe(s)" in done.stdout


def test_seed_json_contract(seed):
    done = kaobs("analyze", seed, *SEED_EXPECT, "--client-dsn", "host=db keepalives_idle=30", "--format", "json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    [conn] = doc["connections"]
    assert conn["client"] == "172.17.0.1:45734" and conn["server"] == "172.17.0.2:5432"
    assert conn["verdict"] == "match" and conn["end_reason"] == "keepalive_abort"
    assert isinstance(conn["start"], float) and conn["end"] - conn["start"] == pytest.approx(15.13, abs=0.01)
    server = conn["sides"]["server"]
    assert server["keepalive_probes"] == 5 and server["answered_probes"] == 2 and server["window_probes"] == 0
    assert server["observed"]["count"] == 3
    assert server["observed"]["interval"] == pytest.approx(2.016, abs=0.002)
    assert server["abort"]["reason"] == "keepalive_count"
    assert server["abort"]["t"] == pytest.approx(conn["end"])
    statuses = {f["setting"]: f["status"] for f in server["findings"]}
    assert statuses == {"tcp_keepalives_idle": "match", "tcp_keepalives_interval": "match", "tcp_keepalives_count": "match"}
    assert [p["frame"] for p in server["probes"]] == [11, 13, 15, 16, 17]
    client = conn["sides"]["client"]
    assert client["keepalive_probes"] == 0 and client["abort"] is None
    assert {f["setting"] for f in client["findings"]} >= {"keepalives_idle"}
    for f in server["findings"] + client["findings"]:
        assert set(f) == {"setting", "expected", "observed", "status", "detail"}


def test_contradicting_expectation_exits_1(seed):
    done = kaobs("analyze", seed, "--expect", "tcp_keepalives_count=5", "--expect", "tcp_keepalives_interval=2")
    assert done.returncode == 1
    assert "MISMATCH" in done.stdout


def test_no_expectation_is_unverified_exit_0(seed):
    done = kaobs("analyze", seed, "--format", "json")
    assert done.returncode == 0
    assert json.loads(done.stdout)["connections"][0]["verdict"] == "unverified"


def test_other_port_finds_no_connection(seed):
    done = kaobs("analyze", seed, "--port", "5433")
    assert done.returncode == 0
    assert "No Postgres connection" in done.stdout


def test_missing_file(tmp_path):
    assert_one_line_error(kaobs("analyze", str(tmp_path / "nope.pcap")), "nope.pcap")


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.pcap"
    empty.write_bytes(b"")
    assert_one_line_error(kaobs("analyze", str(empty)), "empty")


def test_not_a_capture(tmp_path):
    text = tmp_path / "notes.pcap"
    text.write_text("hello, this is not a capture\n")
    assert_one_line_error(kaobs("analyze", str(text)), "not a pcap")


def test_directory(tmp_path):
    assert_one_line_error(kaobs("analyze", str(tmp_path)))


def test_unknown_link_type(tmp_path):
    import struct

    odd = tmp_path / "odd.pcap"
    odd.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 147))
    assert_one_line_error(kaobs("analyze", str(odd)), "147")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--expect", "tcp_keepalive_idle=3"], "tcp_keepalives_idle"),
        (["--expect", "tcp_keepalives_idle=abc"], "tcp_keepalives_idle"),
        (["--expect", "tcp_keepalives_count=500"], "tcp_keepalives_count"),
        (["--port", "70000"], "70000"),
        (["--sysctl", "net.ipv4.tcp_keepalive_time=x"], "tcp_keepalive_time"),
        (["--format", "xml"], "xml"),
        (["--bogus"], "--bogus"),
    ],
)
def test_bad_options(seed, args, needle):
    assert_one_line_error(kaobs("analyze", seed, *args), needle)


def test_bad_dsn_never_echoes_the_password(seed):
    done = kaobs("analyze", seed, "--client-dsn", "host=db password='hunter2 keepalives_idle=3")
    assert_one_line_error(done)
    assert "hunter2" not in done.stderr + done.stdout


def test_password_not_in_reports(seed):
    done = kaobs("analyze", seed, "--client-dsn", "postgresql://app:hunter2@db/app?keepalives_idle=30", "--format", "json")
    assert done.returncode == 0
    assert "hunter2" not in done.stdout + done.stderr


def test_truncated_capture_warns_and_analyses_what_is_there(seed, tmp_path):
    data = Path(seed).read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[:-30])
    done = kaobs("analyze", str(cut), "--format", "json")
    assert done.returncode == 0
    assert "warning" in done.stderr and "Traceback" not in done.stderr
    doc = json.loads(done.stdout)
    assert doc["input"]["warnings"]
    assert doc["connections"][0]["sides"]["server"]["keepalive_probes"] == 5
    assert doc["connections"][0]["end_reason"] == "open"  # the RST was in the cut-off record
