"""`--format mermaid`: one connection's keepalive episode as a Mermaid sequenceDiagram, for an issue or a wiki.

GitHub (and GitLab, Notion, mermaid.live) draws a ```mermaid block: the
client, the server (and the path when it cut the connection) as
participants, the last packet before the idle, each probe and its answer
(``-x`` for a probe nobody answered), the abort, RST or FIN, a stall's
retransmissions, and the verdict in a note. The marks are those of
`kaobs.episode`, in the text report's words; runs of answered probes are
folded into a ``loop`` so a long episode stays short.

Which connection: `--connection N`, else the worst one the reports hold
(settings contradicted, then a backend that outlived its abort, the path's
cut, a keepalive abort; then one that probed), among those `--only` keeps.
Only that one report is held while the others stream by.
"""
from __future__ import annotations

import re
from typing import IO, Iterable

from analysis.pgsessions import PostgresView
from analysis.settings import CLIENT, SERVER
from analysis.verdict import ConnectionReport
from analysis.words import age, utc_clock
from kaobs.episode import (
    ABORT,
    ANSWER,
    CUT,
    FIN,
    GIVE_UP,
    LAST_DATA,
    PATH,
    PROBE,
    RESEND,
    RETURN,
    RST,
    STALL_DATA,
    WINDOW_PROBE,
    Episode,
    Mark,
    build_episode,
    trouble,
)
from kaobs.report import TRIAGE_KINDS, TextOptions, is_listed, report_kinds

ALIAS = {CLIENT: "C", SERVER: "S", PATH: "P"}
BREAK = "<br/>"
"""A line break inside a note: GitHub's renderer keeps notes narrow with it."""
LOOP_AT = 4
"""Answered probes in a row from this many on are drawn once, in a loop."""


def clean(text: str) -> str:
    """Message text Mermaid reads as text: ';' ends a statement and '#' starts an entity code there."""
    text = text.replace(";", ",").replace("#", "no. ")
    return re.sub(r"\s+", " ", text).strip()


def _other(lane: str) -> str:
    return CLIENT if lane == SERVER else SERVER


def sequence_diagram(report: ConnectionReport, source: str = "") -> str:
    """The Mermaid text of one connection's episode."""
    conn = report.connection
    episode = build_episode(report)
    rel = episode.rel
    lines = ["sequenceDiagram",
             f"    %% kaobs: connection #{conn.index} {conn.client.endpoint} -> {conn.server.endpoint}, "
             f"{report.verdict.upper()}" + (f", {source}" if source else ""),
             f"    participant C as client {clean(conn.client.endpoint)}"]
    if report.path_cut is not None:
        lines.append("    participant P as the path")
    lines.append(f"    participant S as server {clean(conn.server.endpoint)}")
    lines.append(f"    Note over C,S: first packet {utc_clock(conn.start)} UTC, times below are since then")
    items: list[tuple[float, int, list[str]]] = []  # (t, order, lines)
    marks = episode.marks
    probes = {(m.lane, m.number): m.t for m in marks if m.kind == PROBE}
    i = 0
    while i < len(marks):
        mark = marks[i]
        run = _answered_run(marks, i)
        if run >= LOOP_AT:
            items.append((mark.t, 1, _loop(marks[i:i + 2 * run], rel)))
            i += 2 * run
            continue
        if mark.kind in (RESEND, WINDOW_PROBE):  # a run of them is one line
            j = i
            while j < len(marks) and marks[j].kind == mark.kind and marks[j].lane == mark.lane:
                j += 1
            first, last = marks[i], marks[j - 1]
            me, peer = ALIAS[mark.lane], ALIAS[_other(mark.lane)]
            if mark.kind == RESEND:
                line = (f"    Note over {me}: {j - i} retransmission(s) {rel(first.t)} .. {rel(last.t)}, none "
                        "acknowledged")
            else:
                line = (f"    {me}->>{peer}: {j - i} zero-window probe(s) {rel(first.t)} .. {rel(last.t)} (persist "
                        "timer: its data waits, not keepalive)")
            items.append((mark.t, 1, [line]))
            i = j
            continue
        items.append((mark.t, 1, _mark_lines(episode, mark, probes)))
        i += 1
    for deadline in episode.deadlines:
        words = clean(deadline.text.removeprefix(f"{deadline.lane}'s ").removeprefix(f"the {deadline.lane}'s "))
        items.append((deadline.t, 0, [f"    Note over {ALIAS[deadline.lane]}: {words.replace(': ', BREAK, 1)}"]))
    for band in episode.bands:
        if band.kind == GIVE_UP:
            items.append((band.start, 2, [f"    Note over {ALIAS[band.lane]}: {clean(band.text)}"]))
    items.sort(key=lambda item: (item[0], item[1]))
    for _, _, block in items:
        lines += block
    lines.append(f"    Note over C,S: {_verdict_words(report)}")
    return "\n".join(lines) + "\n"


def _answered_run(marks: list[Mark], i: int) -> int:
    """How many (answered probe, its answer) pairs in a row start at marks[i]."""
    run = 0
    prober = marks[i].lane
    while i + 1 < len(marks):
        probe, answer = marks[i], marks[i + 1]
        if not (probe.kind == PROBE and probe.lane == prober and probe.answered and answer.kind == ANSWER
                and answer.lane == _other(prober) and answer.number == probe.number and answer.answered):
            break
        run += 1
        i += 2
    return run


def _loop(pairs: list[Mark], rel) -> list[str]:
    probes = pairs[::2]
    prober, peer = ALIAS[probes[0].lane], ALIAS[_other(probes[0].lane)]
    gaps = [b.t - a.t for a, b in zip(probes, probes[1:])]
    every = f", about every {age(sorted(gaps)[len(gaps) // 2])}" if gaps else ""
    return [f"    loop probes {probes[0].number} to {probes[-1].number}, {rel(probes[0].t)} .. {rel(probes[-1].t)}"
            f"{every}: all answered",
            f"        {prober}->>{peer}: probe",
            f"        {peer}-->>{prober}: answer",
            "    end"]


def _mark_lines(episode: Episode, mark: Mark, probes: dict[tuple[str, int | None], float]) -> list[str]:
    report, rel = episode.report, episode.rel
    lane = mark.lane
    text = clean(mark.text)
    if mark.kind == LAST_DATA:
        prober = _other(lane)
        return [f"    {ALIAS[lane]}->>{ALIAS[prober]}: last packet before the idle ({rel(mark.t)})"]
    if mark.kind == PROBE:
        me, peer = ALIAS[lane], ALIAS[_other(lane)]
        words = text.removeprefix(f"{lane} ")
        if mark.answered:
            words = words.split(": answered", 1)[0]  # the answer's own arrow follows
        arrow = "->>" if mark.answered else "-x"
        return [f"    {me}{arrow}{peer}: {words} ({rel(mark.t)})"]
    if mark.kind == ANSWER:
        me, prober = ALIAS[lane], ALIAS[_other(lane)]
        probe_t = probes.get((_other(lane), mark.number))
        took = f" in {(mark.t - probe_t) * 1000:.2f} ms" if probe_t is not None else ""
        if mark.answered:
            return [f"    {me}-->>{prober}: answer to probe {mark.number}{took}"]
        return [f"    {me}--x{prober}: answer to probe {mark.number}{took}, lost before reaching the {_other(lane)}"]
    if mark.kind in (ABORT, RST, FIN):
        me, peer = ALIAS[lane], ALIAS[_other(lane)]
        words = text.removeprefix(f"{lane} ")
        if mark.kind == FIN:
            return [f"    {me}->>{peer}: FIN ({rel(mark.t)})"]
        return [f"    {me}-){peer}: {words} ({rel(mark.t)})"]
    if mark.kind == STALL_DATA:
        me = ALIAS[lane]
        target = "P" if report.path_cut is not None else ALIAS[_other(lane)]
        return [f"    {me}-x{target}: {clean(text.split(': ', 1)[0].removeprefix(f'{lane} '))}, never acknowledged "
                f"({rel(mark.t)})"]
    if mark.kind == CUT:
        cut = report.path_cut
        assert cut is not None
        idle = f" after {age(cut.idle_before)} idle" if cut.idle_before is not None else ""
        inferred = " (inferred: silent longer than the path keeps connections)" if cut.inferred else ""
        if cut.kind == "reset" and cut.far in (CLIENT, SERVER):
            receiver = ALIAS[_other(cut.far)]
            return [f"    P-){receiver}: RST in the {cut.far}'s name ({rel(cut.t)}): PATH RESET{idle}",
                    f"    Note over P: {clean(cut.evidence)}"]
        return [f"    Note over P: PATH {cut.kind.upper()}{idle}{inferred} ({rel(cut.t)})"]
    if mark.kind == RETURN:
        me, peer = ALIAS[lane], ALIAS[_other(lane)]
        return [f"    {me}->>{peer}: {text} ({rel(mark.t)})"]
    return [f"    Note over {ALIAS[lane]}: {text}"]


def _verdict_words(report: ConnectionReport) -> str:
    """The verdict, then each judged setting on a line of its own: expected, ✓ or ✗, observed."""
    judged = [clean(f"{side.role} {f.setting} {f.value_text} {'✓' if f.status == 'match' else '✗'} {f.observed}")
              for side in (report.server, report.client) for f in side.findings if f.status != "unobservable"]
    return BREAK.join([report.verdict.upper(), *judged])


# -- choosing the connection ---------------------------------------------------------------------------


def _rank(report: ConnectionReport, postgres: PostgresView | None) -> int:
    kind = trouble(report, postgres)
    if kind is not None:
        return TRIAGE_KINDS.index(kind)
    return len(TRIAGE_KINDS) + (0 if "probing" in report_kinds(report, postgres) else 1)


def pick(reports: Iterable[ConnectionReport], options: TextOptions | None = None,
         postgres: PostgresView | None = None) -> tuple[ConnectionReport | None, int]:
    """The connection to draw, and how many there were: --connection N, else the worst that --only keeps.

    Holds one report at a time (the best so far): the stream can be long.
    """
    options = options or TextOptions()
    best: ConnectionReport | None = None
    best_rank = 1 << 30
    total = 0
    for report in reports:
        total += 1
        if not is_listed(report, report_kinds(report, postgres), TextOptions(options.only, show_all=True,
                                                                                connection=options.connection)):
            continue
        rank = _rank(report, postgres)
        if rank < best_rank:
            best, best_rank = report, rank
    return best, total


def write_mermaid(out: IO[str], reports: Iterable[ConnectionReport], options: TextOptions | None = None,
                  source: str = "", postgres: PostgresView | None = None) -> ConnectionReport | None:
    """Print the diagram of the chosen connection (or a diagram saying there is none); returns the one drawn."""
    options = options or TextOptions()
    connection = options.connection
    chosen, total = pick(reports, options, postgres)
    if chosen is None:
        why = (f"no connection #{connection}" if connection is not None
               else "no connection that --only keeps" if options.only
               else "no Postgres connection")
        out.write("sequenceDiagram\n    participant C as client\n    participant S as server\n"
                  f"    Note over C,S: {clean(why)} in {clean(source) or 'the capture'} ({total} connection(s))\n")
    else:
        out.write(sequence_diagram(chosen, source))
    out.flush()
    return chosen
