"""Mutated real captures through the whole command (`kaobs.cli.run`), text and JSON: never a traceback.

`tests/test_pcapfile_fuzz.py` holds the reader to its promises; this holds
everything after it too (the model, the verdicts, both reports, the clocks,
the exit status) on the real captures of captures/, damaged as files are
damaged: bytes flipped, fields set to extremes (a timestamp in year 148165,
a length of 4 GB), cut short, spliced, compressed. The promise: exit 0 or 1
with a report (valid JSON with --format json), or exit 2 with one line on
stderr (after any warnings about what was read before). Bounded: KAOBS_FUZZ_EXAMPLES=5000 searches deeper locally.
"""
from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kaobs.cli import run

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = json.loads((ROOT / "captures" / "manifest.json").read_text())["captures"]
CAPTURES = {entry["file"]: ((ROOT / "captures" / entry["file"]).read_bytes(), entry["expect_args"])
            for entry in MANIFEST}
EXAMPLES = int(os.environ.get("KAOBS_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=EXAMPLES or 150, deadline=None, derandomize=not EXAMPLES,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

flip = st.tuples(st.just("flip"), st.integers(min_value=0), st.integers(min_value=1, max_value=255))
extreme = st.tuples(st.just("u32"), st.integers(min_value=0),
                    st.sampled_from([0, 1, 0x40000000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]))
cut = st.tuples(st.just("cut"), st.integers(min_value=0), st.just(0))
splice = st.tuples(st.just("splice"), st.integers(min_value=0), st.integers(min_value=0))
mutation = st.one_of(flip, extreme, cut, splice)


def mutate(data: bytes, mutations) -> bytes:
    out = bytearray(data)
    for kind, where, value in mutations:
        if not out:
            break
        at = where % len(out)
        if kind == "flip":
            out[at] ^= value
        elif kind == "u32":
            out[at:at + 4] = struct.pack("<I", value)[: len(out) - at]
        elif kind == "cut":
            del out[at:]
        else:  # a stretch of the file repeated elsewhere (a writer that restarted)
            size = 1 + value % 200
            out[at:at] = out[value % len(out):value % len(out) + size]
    return bytes(out)


def run_kaobs(capsys, args: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = run(args)
    except SystemExit as done:  # run() ends a user error with sys.exit(2), as `kaobs` does
        code = int(done.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@FUZZ
@given(name=st.sampled_from(sorted(CAPTURES)), mutations=st.lists(mutation, min_size=1, max_size=6),
       fmt=st.sampled_from(["text", "json"]), judged=st.booleans(), compressed=st.booleans())
def test_mutated_captures_through_the_command(tmp_path, capsys, name, mutations, fmt, judged, compressed):
    data, expect_args = CAPTURES[name]
    damaged = mutate(data, mutations)
    path = tmp_path / (name + (".gz" if compressed else ""))
    path.write_bytes(gzip.compress(damaged) if compressed else damaged)
    code, out, err = run_kaobs(capsys, ["analyze", str(path), "--format", fmt, *(expect_args if judged else [])])
    assert "Traceback" not in err and "Traceback" not in out
    assert code in (0, 1, 2), (code, err)
    if code == 2:  # one line of error, last; warnings about the damage read before it may precede it
        *warnings, error = err.strip().splitlines()
        assert error.startswith("kaobs: error: ") and path.name in error, err
        assert all(line.startswith("kaobs: warning: ") for line in warnings), err
        return
    for line in err.strip().splitlines():
        assert line.startswith("kaobs: warning: "), err
    if fmt == "json":
        document = json.loads(out)
        assert document["summary"]["connections"] == len(document["connections"])
    else:
        assert "connection(s):" in out or "No Postgres connection" in out


def test_the_issue_examples_by_hand(tmp_path, capsys):
    """The two crashes found by hand: byte 143 = 0x40 (year 148165) and a pcapng cut inside a block."""
    data, expect_args = CAPTURES["both_sides_server_idle3_client_idle2.pcapng"]
    for damaged in (mutate(data, [("u32", 140, 0x40000000)]), mutate(data, [("flip", 143, 0x40)]), data[:300]):
        path = tmp_path / "damaged.pcapng"
        path.write_bytes(damaged)
        for fmt in ("text", "json"):
            code, out, err = run_kaobs(capsys, ["analyze", str(path), "--format", fmt, *expect_args])
            assert code in (0, 1) and "Traceback" not in err, err
