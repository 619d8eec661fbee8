"""`kaobs watch --write` rotated as tcpdump's -C (size), -G (time, strftime names) and -W (file count) do.

The writer is driven with frames of a known conversation, repeated; every
file must be a whole pcap that kaobs and tshark read, the files together
must hold every record in order, and -W must leave only the newest files.
The privileged test at the bottom runs the real command on loopback and
stops it with SIGINT.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sniffer.pcapwrite import RotatingPcapWriter
from tests.pcap_builders import LINKTYPE_ETHERNET, conversation, frame_for
from tests.test_pcapfile import read, tshark_segments

TSHARK = shutil.which("tshark")
ROOT = Path(__file__).resolve().parent.parent
T0 = 1_764_597_600.0  # 2025-12-01 14:00:00 UTC


def frames(count: int) -> list[bytes]:
    packets = conversation()
    return [frame_for(LINKTYPE_ETHERNET, packets[i % len(packets)]) for i in range(count)]


def write_all(writer: RotatingPcapWriter, data: list[bytes], step: float = 0.5) -> list[float]:
    stamps = [T0 + i * step for i in range(len(data))]
    for frame, t in zip(data, stamps):
        writer.write(frame, t)
    writer.close()
    return stamps


def records_in(paths: list[Path]) -> list[float]:
    out = []
    for path in paths:
        segments, stats, warned = read(path, dedupe=False)
        assert stats.complete and warned == [], (path, warned)
        out += [s.t for s in segments]
    return out


def test_file_size_starts_numbered_files_none_past_the_size(tmp_path):
    base = tmp_path / "pg.pcap"
    writer = RotatingPcapWriter(str(base), LINKTYPE_ETHERNET, file_size=1000)
    stamps = write_all(writer, frames(60))
    names = [Path(name).name for name in writer.files]
    assert len(names) > 3 and names[:3] == ["pg.pcap", "pg.pcap1", "pg.pcap2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    assert all(os.path.getsize(tmp_path / name) <= 1000 for name in names)
    assert records_in([tmp_path / name for name in names]) == pytest.approx(stamps, abs=1e-6)
    assert all((os.stat(tmp_path / name).st_mode & 0o777) == 0o600 for name in names)


def test_file_count_keeps_a_ring_of_the_newest_files(tmp_path):
    base = tmp_path / "pg.pcap"
    writer = RotatingPcapWriter(str(base), LINKTYPE_ETHERNET, file_size=1000, file_count=3, mode=0o640)
    stamps = write_all(writer, frames(200))
    on_disk = sorted(p.name for p in tmp_path.iterdir())
    assert on_disk == ["pg.pcap0", "pg.pcap1", "pg.pcap2"]  # tcpdump -W 3: numbered from 0, reused in a ring
    kept = [tmp_path / Path(name).name for name in writer.files]
    got = records_in(kept)  # oldest first: the newest records, in order, up to the last one written
    assert got == pytest.approx(stamps[-len(got):], abs=1e-6) and len(got) < len(stamps) / 2
    assert all((os.stat(path).st_mode & 0o777) == 0o640 for path in kept)


def test_rotate_seconds_names_files_through_strftime_and_file_count_deletes_the_oldest(tmp_path):
    pattern = str(tmp_path / "pg-%H%M%S.pcap")
    writer = RotatingPcapWriter(pattern, LINKTYPE_ETHERNET, rotate_seconds=10, file_count=4, start=T0)
    stamps = write_all(writer, frames(120), step=0.5)  # 60 s: six intervals of 10 s
    expected = [time.strftime("pg-%H%M%S.pcap", time.localtime(T0 + 10 * k)) for k in range(2, 6)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)
    assert [Path(name).name for name in writer.files] == expected
    got = records_in([tmp_path / name for name in expected])
    assert got == pytest.approx(stamps[40:], abs=1e-6)  # the last four intervals, whole


def test_rotate_seconds_with_file_size_numbers_within_an_interval(tmp_path):
    pattern = str(tmp_path / "pg-%M%S.pcap")
    writer = RotatingPcapWriter(pattern, LINKTYPE_ETHERNET, rotate_seconds=20, file_size=1500, start=T0)
    stamps = write_all(writer, frames(80), step=0.5)
    first = time.strftime("pg-%M%S.pcap", time.localtime(T0))
    names = [Path(name).name for name in writer.files]
    assert names[0] == first and names[1] == first + "1"
    second = time.strftime("pg-%M%S.pcap", time.localtime(T0 + 20))
    assert second in names and second + "1" in names
    assert records_in([tmp_path / name for name in names]) == pytest.approx(stamps, abs=1e-6)


@pytest.mark.tshark
@pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")
def test_tshark_reads_every_rotated_file(tmp_path):
    writer = RotatingPcapWriter(str(tmp_path / "pg.pcap"), LINKTYPE_ETHERNET, file_size=1000, file_count=4)
    write_all(writer, frames(100))
    for name in writer.files:
        path = tmp_path / Path(name).name
        theirs = tshark_segments(path)
        ours, _, _ = read(path, dedupe=False)
        assert len(theirs) == len(ours) > 0
        assert [(s.seq, s.ack, s.flags) for s in theirs] == [(s.seq, s.ack, s.flags) for s in ours]


@pytest.mark.parametrize("args, message", [
    (["-C", "1"], "--file-size rotates the --write file"),
    (["-w", "x.pcap", "-W", "3"], "--file-count needs --file-size or --rotate-seconds"),
    (["-w", "x.pcap", "-C", "0"], "--file-size"),
    (["-w", "x.pcap", "-G", "-5"], "--rotate-seconds"),
    (["-w", "x.pcap", "-C", "1", "-W", "0"], "--file-count"),
])
def test_rotation_options_are_checked(tmp_path, args, message):
    done = subprocess.run([sys.executable, "-m", "kaobs", "watch", "-i", "lo", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def churn(port: int, stop: threading.Event, limit: int = 3000) -> None:
    """Short connections to a local listener until `stop` (at most `limit`)."""
    for _ in range(limit):
        if stop.is_set():
            return
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
                conn.sendall(b"x" * 100)
        except OSError:
            time.sleep(0.01)


@pytest.mark.privileged
def test_watch_rotates_on_loopback_and_sigint_leaves_the_last_file_valid(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(512)
    port = listener.getsockname()[1]
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    watch = subprocess.Popen(
        [sys.executable, "-m", "kaobs", "watch", "-i", "lo", "--port", str(port), "--format", "json",
         "-w", str(tmp_path / "lo.pcap"), "-C", "0.02", "-W", "3", "--write-mode", "644"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "lo.pcap0").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        client = threading.Thread(target=churn, args=(port, stop))
        client.start()
        while time.monotonic() < deadline and not (tmp_path / "lo.pcap2").exists():
            time.sleep(0.1)
        time.sleep(1.0)  # into the ring: the first files written over
        watch.send_signal(signal.SIGINT)
        out, err = watch.communicate(timeout=60)
    finally:
        stop.set()
        if watch.poll() is None:
            watch.kill()
        listener.close()
    client.join(timeout=10)
    assert watch.returncode in (0, 1), err
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["lo.pcap0", "lo.pcap1", "lo.pcap2"], names
    for name in names:
        path = tmp_path / name
        assert os.path.getsize(path) <= 20_000 and (os.stat(path).st_mode & 0o777) == 0o644
        segments, stats, warned = read(path, dedupe=False)
        assert stats.complete and warned == [] and segments, (name, warned)
        assert all(s.payload_len == 0 or s.payload_len == 100 for s in segments)
        if TSHARK is not None:
            assert len(tshark_segments(path)) == len(segments)
    # kaobs analyze reads the ring in time order (its glob order may differ)
    done = subprocess.run([sys.executable, "-m", "kaobs", "analyze", "--port", str(port), "--format", "json",
                           *[str(tmp_path / n) for n in names]], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode in (0, 1), done.stderr
    assert '"connections"' in done.stdout
