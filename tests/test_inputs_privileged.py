"""Issue 9 against the real thing (privileged): a lab Postgres for the DSN cases, live capture, the lab image.

The DSN cases run `kaobs analyze --dsn` against PostgreSQL 15 in a lab
container, with a role whose password holds a '/' and an '@' (what breaks
URIs): a misspelt or upper-case password keyword, a URI with the password
not percent-encoded, a quote left open. None may print any piece of the
password; the well-encoded URI must connect. `kaobs watch` is run on
loopback with a filter expression and --write; `kaobs lab` without --image.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest

pytestmark = pytest.mark.privileged

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT / "captures" / "seed_idle3_int2_cnt3_dead_client.pcap"
IMAGE = os.environ.get("KAOBS_LAB_IMAGE", "kaobs/postgres:15-local")
PIECES = ("Qz7v", "Kx9w", "Mb4t")
PASSWORD = f"{PIECES[0]}/{PIECES[1]}@{PIECES[2]}-{secrets.token_hex(3)}"
"""Three pieces around an unencoded '/' and '@': no piece may ever be printed."""


def kaobs(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kaobs", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


def assert_no_piece(done: subprocess.CompletedProcess) -> None:
    shown = done.stdout + done.stderr
    assert "Traceback" not in shown, shown
    for piece in (*PIECES, PASSWORD):
        assert piece not in shown, f"{piece!r} printed:\n{shown}"


@pytest.fixture(scope="module")
def server():
    from kaobs.lab.docker import LabEnvironment
    from kaobs.lab.scenario import FAULT_NONE, Scenario

    env = LabEnvironment(Scenario(fault=FAULT_NONE, duration=60), IMAGE, run_id=f"inputs{secrets.token_hex(3)}",
                         lifetime=400)
    try:
        env.start()
        superuser = f"host={env.server.ip} user=postgres dbname=postgres sslmode=disable connect_timeout=5"
        with psycopg.connect(superuser, password=env.password, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE kaobs LOGIN PASSWORD '{PASSWORD}'")
            conn.execute("GRANT pg_read_all_settings, pg_read_all_stats TO kaobs")
        yield env.server.ip
    finally:
        env.cleanup()


@pytest.mark.parametrize("keyword", ["PASSWORD", "pasword", "Password"])
def test_a_misspelt_password_keyword_never_echoes_the_password(server, keyword):
    dsn = f"host={server} user=kaobs {keyword}={PASSWORD} dbname=postgres sslmode=disable connect_timeout=5"
    done = kaobs("analyze", str(SEED), "--dsn", dsn, "--format", "json")
    assert_no_piece(done)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert f"{keyword}=***" in line and "password" in line.lower()
    assert json.loads(done.stdout)["postgres"]["dsn"] == (
        f"host={server} user=kaobs {keyword}=*** dbname=postgres sslmode=disable connect_timeout=5")


@pytest.mark.parametrize("form", ["slash-and-at", "at-only", "slash-only"])
def test_a_uri_password_not_percent_encoded_is_refused_without_a_piece_of_it(server, form):
    password = {"slash-and-at": PASSWORD, "at-only": PASSWORD.replace("/", ""),
                "slash-only": PASSWORD.replace("@", "")}[form]
    done = kaobs("analyze", str(SEED), "--dsn", f"postgresql://kaobs:{password}@{server}:5432/postgres?sslmode=disable")
    assert_no_piece(done)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert "postgresql://***" in line and "percent-encode" in line.replace("percent-encoded", "percent-encode")


def test_an_open_quote_shows_nothing_after_it(server):
    done = kaobs("analyze", str(SEED), "--dsn", f"host={server} user=kaobs password='{PASSWORD} dbname=postgres")
    assert_no_piece(done)
    assert done.returncode == 2 and "unterminated quoted string" in done.stderr


def test_the_encoded_uri_connects_and_prints_no_password(server):
    dsn = f"postgresql://kaobs:{quote(PASSWORD, safe='')}@{server}:5432/postgres?sslmode=disable&connect_timeout=5"
    done = kaobs("analyze", str(SEED), "--dsn", dsn, "--format", "json")
    assert_no_piece(done)
    assert done.returncode in (0, 1), done.stderr
    view = json.loads(done.stdout)["postgres"]
    assert view["error"] is None and view["server"]["address"] == server
    assert view["dsn"] == f"user=kaobs password=*** host={server} port=5432 dbname=postgres sslmode=disable connect_timeout=5"
    text = kaobs("analyze", str(SEED), "--dsn", dsn)
    assert_no_piece(text)
    assert f"postgres: {server}:5432" in text.stdout and "password=***" in text.stdout


# -- live capture ------------------------------------------------------------------------------------------


def _talk(port: int, after: float) -> threading.Thread:
    """A listener on 127.0.0.1:port and one client that connects after `after` s, sends a little, and leaves."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1)
    listener.settimeout(10)

    def serve() -> None:
        try:
            time.sleep(after)
            with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
                accepted, _ = listener.accept()
                with accepted:
                    client.sendall(b"Q" * 100)
                    accepted.recv(100)
                    accepted.sendall(b"R" * 100)
                    client.recv(100)
        finally:
            listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("expression, connections", [("host 127.0.0.9", 0), ("host 127.0.0.1", 1)],
                         ids=["filtered-out", "kept"])
def test_watch_ands_the_expression_into_the_kernel_filter_and_writes_0600(tmp_path, expression, connections):
    port = _free_port()
    written = tmp_path / "live.pcap"
    talker = _talk(port, after=1.5)
    old = os.umask(0o022)
    try:
        done = kaobs("watch", "-i", "lo", "--port", str(port), expression, "--duration", "4", "--format", "json",
                     "-w", str(written), "--full-packets", timeout=60)
    finally:
        os.umask(old)
    talker.join(10)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["input"]["filter"] == {"expression": expression, "since": None, "until": None, "filtered_out": None}
    assert len(doc["connections"]) == connections
    assert stat.S_IMODE(written.stat().st_mode) == 0o600  # whole packets: queries and passwords
    reread = json.loads(kaobs("analyze", str(written), "--port", str(port), "--format", "json").stdout)
    assert len(reread["connections"]) == connections


# -- the lab's image ---------------------------------------------------------------------------------------


def test_lab_without_image_runs_as_the_readme_writes_it(tmp_path):
    from kaobs.lab.docker import DEFAULT_IMAGE, LOCAL_IMAGE, image_present

    expected = DEFAULT_IMAGE if image_present(DEFAULT_IMAGE) else LOCAL_IMAGE
    if not image_present(expected):
        pytest.fail(f"neither {DEFAULT_IMAGE} nor {LOCAL_IMAGE} is here (bash scripts/setup.sh builds the second)")
    env = {k: v for k, v in os.environ.items() if k != "KAOBS_LAB_IMAGE"}
    written = tmp_path / "lab.pcap"
    done = kaobs("lab", "--fault", "none", "--tcp-keepalives-idle", "1", "--tcp-keepalives-interval", "1",
                 "--tcp-keepalives-count", "2", "--duration", "3", "--format", "json", "-w", str(written),
                 env=env, timeout=240)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["lab"]["image"] == expected
    assert stat.S_IMODE(written.stat().st_mode) == 0o600  # headers only, still the owner's alone
    assert re.search(r"kaobs lab: \S+", done.stderr)
