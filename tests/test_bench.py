"""The benchmark's generator and comparison: the truth file must be what tshark and kaobs see.

`bench/bench_analyze.py` judges kaobs against tshark and against the truth
file of `bench/make_capture.py`; if the generator drew probes that tshark
would not flag, or the comparison could not fail, the benchmark's
"same probes" would mean nothing.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("bench") / "small.pcap"
    truth = _load("make_capture").generate(str(path), 25_000, seed=11, snaplen=128)
    return path, truth


def test_generator_is_deterministic_and_mixes_every_kind_of_probe(tmp_path, small):
    path, truth = small
    again = tmp_path / "again.pcap"
    assert _load("make_capture").generate(str(again), 25_000, seed=11, snaplen=128) == truth
    assert again.read_bytes() == path.read_bytes()
    probes = truth["keepalive_probes"]
    assert {p["side"] for p in probes} == {"server", "client"}
    assert {p["answered"] for p in probes} == {True, False}
    assert truth["zero_window_probes"] and truth["packets"] == 25_000


@pytest.mark.tshark
@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_tshark_flags_exactly_the_truths_probes(small):
    path, truth = small
    out = subprocess.run(["tshark", "-r", str(path), "-Y", "tcp.analysis.keep_alive", "-T", "fields",
                          "-e", "frame.number"], capture_output=True, text=True, check=True).stdout
    flagged = {int(line) for line in out.split()}
    assert flagged == {p["frame"] for p in truth["keepalive_probes"]} | set(truth["zero_window_probes"])


def test_comparison_agrees_on_kaobs_output_and_catches_a_missing_probe(tmp_path, small):
    path, truth = small
    bench = _load("bench_analyze")
    report = tmp_path / "kaobs.json"
    with report.open("w") as out:
        code = subprocess.run([sys.executable, "-m", "kaobs", "analyze", str(path), "--format", "json"],
                              stdout=out, cwd=ROOT).returncode
    assert code in (0, 1)
    ok, lines, counts = bench.compare(truth, str(report), None)
    assert ok, lines
    assert counts["kaobs_keepalive"] == len(truth["keepalive_probes"])
    document = json.loads(report.read_text())
    for conn in document["connections"]:
        for side in conn["sides"].values():
            if side["probes"]:
                side["probes"].pop()
                report.write_text(json.dumps(document))
                ok, lines, _ = bench.compare(truth, str(report), None)
                assert not ok and any("DIFFER" in line for line in lines)
                return
    pytest.fail("no probe in the report")
