"""A connection's keepalive episode as marks on three lanes: the client's kernel, the path, the server's kernel.

What the pictures draw (`kaobs.htmlreport`, `kaobs.mermaid`), taken from the
same `ConnectionReport` the text and JSON reports print, in the text report's
words (`kaobs.report`): the last packet before an idle, each probe (answered
or not, as the prober saw it) and its answer, the window the verdict allowed
each timer (`Check.tolerance`), the moments the settings predict (first probe
due, abort due) from the kernel's own timer (`analysis.kernel_timer`), the
abort, RST or FIN, stalls with their retransmissions and give-up, the path's
cut and the idle cut inferred across connections, and the peer that came back.
Times are absolute (Unix seconds); `Episode.start` is the connection's first
packet.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from analysis.kernel_timer import TimerState, abort_due, next_tick
from analysis.model import WINDOW
from analysis.path import IdleCut
from analysis.settings import CLIENT, SERVER
from analysis.verdict import ConnectionReport, SideReport
from analysis.words import age
from kaobs.report import TRIAGE_KINDS, probe_events, report_kinds, stall_words

PATH = "path"
LANES = (CLIENT, PATH, SERVER)
"""Top to bottom, as a sequence diagram puts the client left."""

# Mark kinds
LAST_DATA = "last_data"
PROBE = "probe"
ANSWER = "answer"
WINDOW_PROBE = "window_probe"
ABORT = "abort"
RST = "rst"
FIN = "fin"
STALL_DATA = "stall_data"
RESEND = "resend"
CUT = "cut"
RETURN = "return"

# Band kinds
TOLERANCE = "tolerance"
STALL = "stall"
GIVE_UP = "give_up"
IDLE_CUT = "idle_cut"

# Deadline kinds
FIRST_PROBE_DUE = "first_probe_due"
ABORT_DUE = "abort_due"
GIVE_UP_DUE = "give_up_due"


@dataclass(slots=True)
class Mark:
    """Something that happened (or was due and did not come), on one lane."""

    t: float
    lane: str
    kind: str
    text: str
    answered: bool | None = None
    number: int | None = None


@dataclass(slots=True)
class Band:
    """A span on one lane: a timer's tolerance window, a stall, a give-up window, the path's idle cut."""

    start: float
    end: float
    lane: str
    kind: str
    text: str
    ok: bool = True
    """A tolerance window the event fell outside of is a contradiction (False)."""


@dataclass(slots=True)
class Deadline:
    """A moment the settings predict: the first probe due, the abort due, the kernel's give-up."""

    t: float
    lane: str
    kind: str
    text: str


@dataclass(slots=True)
class Episode:
    report: ConnectionReport
    start: float
    end: float
    marks: list[Mark] = field(default_factory=list)
    bands: list[Band] = field(default_factory=list)
    deadlines: list[Deadline] = field(default_factory=list)

    def times(self) -> list[float]:
        """Every moment drawn: what the time axis must show."""
        out = [self.start, self.end]
        out += [m.t for m in self.marks]
        out += [d.t for d in self.deadlines]
        for band in self.bands:
            out += [band.start, band.end]
        return out

    def rel(self, t: float) -> str:
        return f"+{t - self.start:.3f} s"


def build_episode(report: ConnectionReport, idle_cut: IdleCut | None = None) -> Episode:
    """The marks, bands and deadlines of one connection. `idle_cut`: the path's, for its host pair, if known."""
    conn = report.connection
    episode = Episode(report, conn.start, conn.end)
    for side in (report.server, report.client):
        _side_marks(episode, side)
        _tolerances(episode, side)
        _deadlines(episode, side)
        _stalls(episode, side)
    _path(episode, idle_cut)
    _after_end(episode)
    episode.marks.sort(key=lambda m: m.t)
    return episode


def _peer(role: str) -> str:
    return CLIENT if role == SERVER else SERVER


def _side_marks(episode: Episode, side: SideReport) -> None:
    report, role, peer = episode.report, side.role, _peer(side.role)
    endpoint = side.endpoint
    words = [text for _, text in probe_events(side, episode.start)]
    previous_answer: float | None = None
    for number, (view, text) in enumerate(zip(side.probes, words), 1):
        probe = view.probe
        if view.index == 1 and view.anchor is not None and view.anchor != previous_answer:
            episode.marks.append(Mark(view.anchor, peer, LAST_DATA,
                                      f"the last packet the {role} accepted from the {peer} before the idle, at "
                                      f"{episode.rel(view.anchor)}; its first probe came {age(probe.t - view.anchor)} "
                                      "later"))
        episode.marks.append(Mark(probe.t, role, PROBE, text, view.answered, number))
        if probe.answer_t is not None:
            lost = f"; lost before reaching the {role}" if view.answer_lost else ""
            episode.marks.append(Mark(probe.answer_t, peer, ANSWER,
                                      f"the {peer} answered {role} probe {number} "
                                      f"({(probe.answer_t - probe.t) * 1000:.2f} ms){lost}", not view.answer_lost,
                                      number))
        previous_answer = probe.answer_t if view.answered else None
    window = [p for p in endpoint.probes if p.kind == WINDOW]
    for probe in window:
        episode.marks.append(Mark(probe.t, role, WINDOW_PROBE, f"{role} zero-window probe "
                                  "(persist timer: its data waits for the peer's window, not keepalive)"))
    cut = report.path_cut
    if side.abort is not None:
        abort = side.abort
        why = "keepalive count reached" if abort.reason == "keepalive_count" else "user timeout reached"
        least = "" if abort.since_accepted is not None else "at least "
        episode.marks.append(Mark(abort.t, role, ABORT, f"{role} ABORT (RST) after {least}"
                                  f"{abort.unanswered_probes} unanswered probe(s): {why}"))
    elif endpoint.reset is not None:
        reset = endpoint.reset
        if cut is not None and cut.kind == "reset" and cut.t == reset.t:
            pass  # the path's, drawn on the path's lane
        elif not (report.after_end is not None and report.after_end.told_t == reset.t):
            episode.marks.append(Mark(reset.t, role, RST, f"{role} RST (not a keepalive abort)"))
    if endpoint.fin_t is not None:
        episode.marks.append(Mark(endpoint.fin_t, role, FIN, f"{role} FIN"))


def _tolerances(episode: Episode, side: SideReport) -> None:
    """The window each timed check allowed an event: [due - early, due + late], as the verdict applied it."""
    seen: set[tuple[float, str]] = set()
    for finding in side.findings:
        for check in finding.checks:
            if check.due is None or check.tolerance is None or (check.due, finding.setting) in seen:
                continue
            seen.add((check.due, finding.setting))
            tolerance = check.tolerance
            verdict = "agrees" if check.ok else "CONTRADICTS"
            episode.bands.append(Band(check.due - tolerance.early, check.due + tolerance.late, side.role, TOLERANCE,
                                      f"{finding.setting} {finding.value_text}: due at {episode.rel(check.due)}, "
                                      f"{tolerance.basis}; {verdict}", check.ok))


def _deadlines(episode: Episode, side: SideReport) -> None:
    """First probe due and abort due, by the side's settings, counted from the last packet it accepted.

    For the last series of probes (the one that led to the end), or from the
    last accepted packet when the side never probed. None without settings,
    and none after a connection closed by FIN (the timer stopped).
    """
    settings = side.settings
    if settings is None or settings.enabled is False:
        return
    conn = episode.report.connection
    endpoint = side.endpoint
    views = side.probes
    if views:
        first = max((v for v in views if v.index == 1), key=lambda v: v.t, default=None)
        anchor = first.anchor if first is not None else None
    else:
        anchor = endpoint.last_accepted
    if anchor is None:
        return
    stalled = [s.stall.first_sent for s in side.stalls if s.outcome != "acked"]
    state = TimerState(anchor)
    closed = conn.end_reason == "closed"
    if stalled and (next_tick(state, settings) or math.inf) > min(stalled):
        return  # data in flight first: keepalive does not run, the retransmission timer decides (its give-up is drawn)
    idle_name = next((f.setting for f in side.findings if f.key == "idle"), "idle")
    first_due = next_tick(state, settings)
    if first_due is not None and not (closed and first_due > conn.end):
        episode.deadlines.append(Deadline(first_due, side.role, FIRST_PROBE_DUE,
                                          f"{side.role}'s first probe due at {episode.rel(first_due)}: "
                                          f"{idle_name} {age(settings.idle or 0)} after the last "
                                          f"packet it accepted ({episode.rel(anchor)})"))
    end_due = abort_due(state, settings)
    if end_due is not None and not (closed and end_due > conn.end):
        rule = (f"tcp_user_timeout {settings.user_timeout * 1000:.0f} ms" if settings.user_timeout
                else f"{settings.count} unanswered probe(s) {age(settings.interval or 0)} apart")
        episode.deadlines.append(Deadline(end_due, side.role, ABORT_DUE,
                                          f"{side.role}'s abort due at {episode.rel(end_due)} if nothing answers "
                                          f"after {episode.rel(anchor)}: {rule}"))


def _stalls(episode: Episode, side: SideReport) -> None:
    role = side.role
    capture_end = max(episode.end, episode.start)
    for stall in side.stalls:
        if stall.outcome == "acked" and stall.retransmissions < 3:
            continue  # a lost segment resent once is just TCP
        first = stall.stall.first_sent
        words = stall_words(role, stall, episode.start)
        stop = stall.stall.end_t or (stall.gave_up_between[1] if stall.gave_up_between else capture_end)
        episode.bands.append(Band(first, max(stop, first), role, STALL, words))
        if stall.kind != WINDOW:  # a window stall's probes are marks of their own (WINDOW_PROBE)
            idle = stall.stall.idle_before
            after = f" after {age(idle)} idle" if idle is not None and idle >= 1 else ""
            episode.marks.append(Mark(first, role, STALL_DATA, f"{role} data sent{after}: {words}"))
            for number, t in enumerate(stall.stall.resends, 1):
                episode.marks.append(Mark(t, role, RESEND, f"{role} retransmission {number} of the "
                                          "unacknowledged data"))
        if stall.gave_up_between is not None:
            low, high = stall.gave_up_between
            episode.bands.append(Band(low, high, role, GIVE_UP, f"the {role} gave up in silence (no RST) between "
                                      f"{episode.rel(low)} and {episode.rel(high)}: a retransmission was due and "
                                      "never came"))
        if stall.give_up is not None:
            give_up = stall.give_up
            episode.deadlines.append(Deadline(give_up.t, role, GIVE_UP_DUE,
                                              f"the {role}'s kernel gives up at {episode.rel(give_up.t)} by "
                                              f"{give_up.rule}"))


def _path(episode: Episode, idle_cut: IdleCut | None) -> None:
    cut = episode.report.path_cut
    if cut is None:
        return
    idle = f" after {age(cut.idle_before)} idle" if cut.idle_before is not None else ""
    inferred = " (inferred)" if cut.inferred else ""
    episode.marks.append(Mark(cut.t, PATH, CUT, f"PATH {cut.kind.upper()}{inferred}{idle}: "
                              f"{cut.evidence}"))
    if idle_cut is not None and cut.idle_before is not None:
        quiet_from = cut.t - cut.idle_before
        episode.bands.append(Band(quiet_from + idle_cut.lower, quiet_from + idle_cut.upper, PATH, IDLE_CUT,
                                  f"the path forgets connections idle between {age(idle_cut.lower)} and "
                                  f"{age(idle_cut.upper)} (across the connections of "
                                  f"{idle_cut.hosts[0]} -> {idle_cut.hosts[1]}), counted from the last packet at "
                                  f"{episode.rel(quiet_from)}"))


def _after_end(episode: Episode) -> None:
    report = episode.report
    after = report.after_end
    if after is None:
        return
    ended = report.connection.end
    episode.marks.append(Mark(after.t, after.side, RETURN, f"the {after.side} comes back "
                              f"{age(after.t - ended)} after the connection ended, and sends {after.what}"))
    if after.told_t is not None:
        ender = report.connection.ended_by or _peer(after.side)
        episode.marks.append(Mark(after.told_t, ender, RST, f"{ender} RST: its kernel "
                                  "no longer knows the connection"))


# -- across connections: how long a connection was idle when it was found dead ----------------------

DEATH_CAUSES = ("keepalive abort", "path reset", "path drop", "stall given up")


def idle_before_death(report: ConnectionReport) -> tuple[str, float] | None:
    """(cause, seconds): how long the connection had been silent when the packet that found it dead was sent.

    The idle before a middlebox's cut, before data that was never
    acknowledged, or before the first unanswered probe of a keepalive abort.
    Connections that died after the same idle are a middlebox's signature.
    """
    cut = report.path_cut
    if cut is not None and cut.idle_before is not None:
        return ("path reset" if cut.kind == "reset" else "path drop"), cut.idle_before
    for side in (report.server, report.client):
        for stall in side.stalls:
            if stall.outcome in ("gave_up", "reset") and stall.stall.idle_before is not None:
                return "stall given up", stall.stall.idle_before
    for side in (report.server, report.client):
        abort = side.abort
        if abort is None or not side.probes:
            continue
        first = side.probes[-abort.unanswered_probes] if abort.unanswered_probes <= len(side.probes) else None
        if first is not None and first.probe.idle_before is not None:
            return "keepalive abort", first.probe.idle_before
        if first is not None and first.anchor is not None:
            return "keepalive abort", first.t - first.anchor
    return None


def trouble(report: ConnectionReport, postgres=None) -> str | None:
    """The connection's worst kind of trouble, as the text report's triage ranks them (None: no trouble)."""
    kinds = report_kinds(report, postgres)
    return next((kind for kind in TRIAGE_KINDS if kind in kinds), None)
