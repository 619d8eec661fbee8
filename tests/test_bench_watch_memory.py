"""The memory benchmark (bench/bench_watch_memory.py): its pure parts, and a small run of the real thing as root."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PATH = os.path.join(ROOT, "bench", "bench_watch_memory.py")
_spec = importlib.util.spec_from_file_location("bench_watch_memory", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bench_watch_memory", bench)  # dataclasses look their module up there
_spec.loader.exec_module(bench)


def test_status_fields_in_kb():
    text = "Name:\tpython3\nVmHWM:\t  204800 kB\nVmRSS:\t  190000 kB\nThreads:\t3\n"
    assert bench.parse_status(text) == {"VmHWM": 204800, "VmRSS": 190000}


def test_growth_is_the_most_gained_after_the_first_figure():
    samples = [bench.Sample(0, 1.0, 200 * 1024, 8000), bench.Sample(10, 2.0, 230 * 1024, 8000),
               bench.Sample(20, 3.0, 210 * 1024, None)]
    assert bench.growth(samples, "kaobs_kb") == pytest.approx(30.0)
    assert bench.growth(samples, "tcpdump_kb") == 0.0
    assert bench.growth(samples[:1], "kaobs_kb") is None


def test_a_missing_checkout_is_one_line():
    done = subprocess.run([sys.executable, _PATH, "--kaobs-root", "/nonexistent"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--kaobs-root" in done.stderr


@pytest.mark.privileged
def test_a_small_run_prints_the_figures():
    """A few thousand connections: the benchmark runs end to end and prints what it promises (no timing asserted)."""
    done = subprocess.run([sys.executable, _PATH, "--connections", "2000", "--warmup", "300", "--warmup-seconds", "2",
                           "--every", "1000", "--max-seconds", "120", "--target-mb", "1000"],
                          capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "| kaobs watch RSS |" in out and "| tcpdump RSS |" in out
    assert "final JSON report:" in out and "peak RSS while writing it" in out
    assert "1000 connections after warm-up" in out and "2000 connections after warm-up" in out
    reported = int(out.split("in kaobs's report: ")[1].split(";")[0])
    assert reported >= 2300  # the warm-up's and the churn's connections, each once
