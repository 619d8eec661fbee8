"""Every capture in captures/ gives the same JSON report, byte for byte, as the one kept in tests/golden/.

The reports are the project's contract (README: "JSON contract"), and a
restructuring must not change a byte of them. Each capture is analysed twice:
with its manifest's `expect_args` (judged) and with none (observed only). When a
change is *meant* to alter a report, regenerate the files with

    python3 tests/test_golden_reports.py --regenerate

and review the diff of tests/golden/ like any other change.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

from kaobs.cli import run  # noqa: E402

GOLDEN = ROOT / "tests" / "golden"
ENTRIES = json.loads((ROOT / "captures" / "manifest.json").read_text())["captures"]
CASES = [(entry["file"], variant, entry["expect_args"] if variant == "judged" else [])
         for entry in ENTRIES for variant in ("judged", "observed")]


def report(capture: str, args: list[str], capsys) -> tuple[int, str]:
    """`kaobs analyze captures/FILE --format json ARGS` in process, as the user would run it from the root."""
    capsys.readouterr()
    code = run(["analyze", f"captures/{capture}", "--format", "json", *args])
    return code, capsys.readouterr().out


def golden_path(capture: str, variant: str) -> Path:
    return GOLDEN / f"{capture}.{variant}.json"


@pytest.mark.parametrize("capture,variant,args", CASES, ids=[f"{c}-{v}" for c, v, _ in CASES])
def test_report_is_byte_identical(capture, variant, args, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out = report(capture, args, capsys)
    expected = golden_path(capture, variant).read_text()
    kept_code, kept_out = expected.split("\n", 1)
    assert f"exit {code}" == kept_code
    assert out == kept_out, f"the report of {capture} ({variant}) changed; see the module docstring"


def regenerate() -> None:
    import contextlib
    import io
    import os

    os.chdir(ROOT)
    GOLDEN.mkdir(exist_ok=True)
    for capture, variant, args in CASES:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = run(["analyze", f"captures/{capture}", "--format", "json", *args])
        golden_path(capture, variant).write_text(f"exit {code}\n{out.getvalue()}")
        print(f"wrote {golden_path(capture, variant).relative_to(ROOT)} (exit {code})")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: python3 tests/test_golden_reports.py --regenerate")
    regenerate()
