"""Every real capture under captures/ against what its manifest entry says it must show.

captures/manifest.json holds, per capture, how it was recorded (server GUCs,
libpq parameters, sysctls, the scenario), the `kaobs analyze` arguments that
judge it (`expect_args`), the exit code, and `must_show`: assertions on the
`--format json` document, each with the reason it must hold. The same
assertions judge the committed files (any machine) and fresh recordings made
by captures/record.py (privileged: root, Docker, tcpdump), so CI re-records
every capture on every run and checks the kernel still does what the files
say.

An assertion is {"path": "connections.0.sides.server.keepalive_probes", OP: X, "why": ...}.
Path steps are dict keys, list indexes, or `list[key=value]` (the items of a
list whose `key` equals `value`; a single match is taken as the item).
OPs: eq, min, max, between [lo, hi], startswith, len, eq_path (equal to the
value at another path).
"""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from kaobs.cli import run

CAPTURES = Path(__file__).resolve().parents[1] / "captures"
MANIFEST = CAPTURES / "manifest.json"
ENTRIES: list[dict[str, Any]] = json.loads(MANIFEST.read_text())["captures"]
OPS = {"eq", "min", "max", "between", "startswith", "len", "eq_path"}
_SELECT = re.compile(r"^(?P<key>[^\[]+)\[(?P<field>[^=\]]+)=(?P<value>[^\]]*)\]$")

_analysed: dict[Path, tuple[int, dict[str, Any]]] = {}


def analyse(path: Path, expect_args: list[str], capsys) -> tuple[int, dict[str, Any]]:
    """`kaobs analyze PATH --format json EXPECT_ARGS...` in process: (exit code, document)."""
    key = path.resolve()
    if key not in _analysed:
        capsys.readouterr()
        code = run(["analyze", str(path), "--format", "json", *expect_args])
        out, err = capsys.readouterr()
        assert out.strip(), f"kaobs printed no document for {path.name}: {err}"
        _analysed[key] = (code, json.loads(out))
    return _analysed[key]


def resolve(document: Any, path: str) -> Any:
    value = document
    for step in path.split("."):
        if isinstance(value, list) and not step.isdigit():
            # a selection followed by a key: the selection must have found exactly one item
            if len(value) != 1:
                raise ValueError(f"{len(value)} items selected where one was meant")
            value = value[0]
        selected = _SELECT.match(step)
        if selected:
            value = [item for item in value[selected["key"]] if str(item.get(selected["field"])) == selected["value"]]
        elif isinstance(value, list):
            value = value[int(step)]
        else:
            value = value[step]
    return value


def failures(document: dict[str, Any], must_show: list[dict[str, Any]]) -> list[str]:
    """The must_show assertions that do not hold, each as one readable line."""
    failed = []
    for check in must_show:
        path = check["path"]
        [op] = [k for k in check if k in OPS]
        try:
            value = resolve(document, path)
        except (KeyError, IndexError, TypeError, ValueError) as error:
            failed.append(f"{path}: not in the document ({error!r}); must: {check['why']}")
            continue
        want = check[op]
        if op == "eq":
            ok = value == want
        elif op == "min":
            ok = value is not None and value >= want
        elif op == "max":
            ok = value is not None and value <= want
        elif op == "between":
            ok = value is not None and want[0] <= value <= want[1]
        elif op == "startswith":
            ok = isinstance(value, str) and value.startswith(want)
        elif op == "len":
            ok = len(value) == want
        else:  # eq_path
            want = resolve(document, want)
            ok = value == want
        if not ok:
            failed.append(f"{path} = {value!r}, want {op} {want!r}: {check['why']}")
    return failed


def check_entry(path: Path, entry: dict[str, Any], capsys) -> None:
    code, document = analyse(path, entry["expect_args"], capsys)
    problems = failures(document, entry["must_show"])
    if code != entry["exit_code"]:
        problems.insert(0, f"exit code {code}, want {entry['exit_code']}")
    assert not problems, f"{path.name}:\n  " + "\n  ".join(problems)


# -- the manifest itself ---------------------------------------------------------------


def test_every_capture_file_has_a_manifest_entry():
    files = {p.name for p in CAPTURES.iterdir() if p.suffix in (".pcap", ".pcapng")}
    listed = [e["file"] for e in ENTRIES]
    assert len(listed) == len(set(listed)), "a file is listed twice"
    assert files == set(listed), f"not in the manifest: {files - set(listed)}; missing files: {set(listed) - files}"


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["file"] for e in ENTRIES])
def test_manifest_entry_is_complete(entry):
    for key in ("file", "description", "how", "settings", "expect_args", "exit_code", "must_show"):
        assert key in entry, f"{entry.get('file')}: no {key!r}"
    assert entry["must_show"], "an entry must say what its capture shows"
    for check in entry["must_show"]:
        assert check.get("why"), check
        assert len([k for k in check if k in OPS]) == 1, check
    if entry["how"].get("scenario"):
        assert entry["how"]["capture_seconds"] <= 40, "recordings stay short"
        assert entry["how"]["scenario"] in {"client_vanishes", "healthy", "stop_reading", "middlebox", "client_returns"}


def test_issue_scenarios_are_all_present():
    """The captures the issue asks for, found by what their settings and plans say."""
    entries = ENTRIES
    how = [e["how"] for e in entries]
    assert any(h.get("family") == 6 for h in how), "an IPv6 capture"
    assert any(h.get("interface") == "any" for h in how), "a tcpdump -i any capture"
    assert any(h.get("scenario") == "stop_reading" for h in how), "a client that stops reading"
    assert any(h.get("scenario") == "healthy" and len(e["settings"]["client"]["sessions"]) == 1
               and not e["settings"]["client"].get("libpq") for e, h in zip(entries, how)), "a healthy client"
    assert any("tcp_user_timeout" in e["settings"]["server"]["gucs"] for e in entries), "tcp_user_timeout"
    assert any("keepalives_idle" in e["settings"]["client"].get("libpq", {}) for e in entries), "libpq keepalives on the client"
    assert any(len(e["settings"]["client"]["sessions"]) >= 2
               and len({json.dumps(s, sort_keys=True) for s in e["settings"]["client"]["sessions"]}) >= 2
               for e in entries), "two connections with different per-session settings"
    seed_like = [e for e in entries if e["how"].get("scenario") == "client_vanishes"
                 and e["settings"]["server"]["gucs"] == {"tcp_keepalives_idle": 3, "tcp_keepalives_interval": 2, "tcp_keepalives_count": 3}]
    assert seed_like, "the seed's 3/2/3 dead client, re-recorded"


def test_resolve_and_failures_catch_a_wrong_document():
    """The assertion language must be able to fail: feed it a document that contradicts it."""
    document = {"connections": [{"verdict": "mismatch", "sides": {"server": {"keepalive_probes": 2, "findings": [
        {"setting": "tcp_keepalives_idle", "status": "match"}], "probes": [{"kind": "window"}]}}}],
        "input": {"duplicates_dropped": 3, "tcp_segments": 4}}
    must = [
        {"path": "connections.0.verdict", "eq": "match", "why": "w"},
        {"path": "connections.0.sides.server.keepalive_probes", "between": [3, 5], "why": "w"},
        {"path": "connections.0.sides.server.findings[setting=tcp_keepalives_idle].status", "eq": "match", "why": "ok"},
        {"path": "connections.0.sides.server.probes[kind=keepalive]", "len": 0, "why": "ok"},
        {"path": "connections.0.sides.server.probes[kind=window]", "len": 1, "why": "ok"},
        {"path": "input.duplicates_dropped", "eq_path": "input.tcp_segments", "why": "w"},
        {"path": "connections.1.verdict", "eq": "match", "why": "w"},
    ]
    problems = failures(document, must)
    assert len(problems) == 4, problems
    assert problems[0].startswith("connections.0.verdict = 'mismatch'")


# -- the committed captures -------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["file"] for e in ENTRIES])
def test_capture_shows_what_the_manifest_says(entry, capsys):
    check_entry(CAPTURES / entry["file"], entry, capsys)


RECORDED = [e for e in ENTRIES if e["how"].get("scenario")]


@pytest.mark.parametrize("entry", RECORDED, ids=[e["file"] for e in RECORDED])
def test_recorded_capture_is_headers_only(entry):
    """No query text or message content: every record ends with its TCP header.

    The user's seed capture is kept byte for byte as recorded (snaplen 128,
    trust authentication, so no password in it) and is not checked here.
    """
    from sniffer.dissect import frame_snap_end
    from sniffer.pcapfile import walk_records

    def handler_for(linktype: int, units: int):
        def handle(buf, start: int, end: int, frame: int, t: float, wirelen: int):
            return frame if frame_snap_end(linktype, memoryview(buf)[start:end]) != end - start else None
        return handle

    records, stats = walk_records(CAPTURES / entry["file"], handler_for)
    with_payload = list(records)
    assert stats.packets > 0
    assert not with_payload, f"{entry['file']}: frames with payload bytes: {with_payload[:10]}"


# -- fresh recordings (CI re-records everything) ---------------------------------------------


def load_recorder():
    spec = importlib.util.spec_from_file_location("kaobs_capture_recorder", CAPTURES / "record.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.privileged
def test_rerecorded_captures_show_what_the_manifest_says(tmp_path, capsys):
    """Re-record every recordable capture from a real Postgres 15 in Docker and judge it like the committed one."""
    recorder = load_recorder()
    entries = recorder.recordable(ENTRIES)
    assert len(entries) >= 8
    recorded = recorder.record_all(entries, tmp_path, jobs=2)
    assert recorded and all((tmp_path / e["file"]).exists() for e in entries)  # a pair is recorded in one run
    problems = []
    for entry in entries:
        path = tmp_path / entry["file"]
        try:
            check_entry(path, entry, capsys)
        except AssertionError as error:
            # What the capture shows, in words, so a failure in CI can be understood without the file.
            capsys.readouterr()
            run(["analyze", str(path), *entry["expect_args"]])
            problems.append(f"{error}\n{capsys.readouterr().out}")
    assert not problems, f"recordings kept in {tmp_path}\n" + "\n".join(problems)
    from tests.test_tshark_crosscheck import cross_check, tshark_missing

    if tshark_missing() is None:
        for entry in entries:
            cross_check(tmp_path / entry["file"], entry, capsys)
