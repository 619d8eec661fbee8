"""`--html FILE`: the keepalive episodes as one self-contained HTML page that opens offline.

Drawn with Bokeh (`bokeh.embed.components`, BokehJS inlined once per page):
its core script is 1.3 MB where plotly's is 4.8 MB, a page is drawn in
about a second in a headless browser, and it gives zoom, pan and hover on a
canvas for free. Each connection is a swimlane figure (the client's kernel,
the path, the server's kernel) on a broken time axis (`TimeAxis`): a stretch
with nothing to show is drawn short, hatched and labelled with its real
length, so two hours of idle and two seconds of probes are both readable.
What is drawn comes from `kaobs.episode`, in the text report's words.

The page is written as the reports stream by (`HtmlReport.add`, then
`finish`): every connection is counted in the overview at the top (verdicts,
the worst problems, a histogram of the idle before death), and lanes are
drawn for at most `LANES_PER_KIND` connections of each kind of trouble
(settings contradicted, a backend that outlived its abort, the path's cut,
a keepalive abort) and `OTHER_LANES` others, probing ones first. A lane is
rendered when its report arrives and kept on a temporary file, so a
capture of a million packets holds no more than a few reports at a time.
Bokeh's Python side costs about 0.1 s a figure, which is what bounds the
lanes; in the browser each figure is drawn when it scrolls into view, so a
page of fifty lanes opens as fast as one of three.
"""
from __future__ import annotations

import html
import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from statistics import median
from typing import IO, Any, Iterable, Iterator

from analysis.expect import Expectations
from analysis.path import IdleCut, PathSummary
from analysis.pgsessions import PostgresView
from analysis.pipeline import AnalysisRun
from analysis.settings import CLIENT, SERVER
from analysis.verdict import VERDICTS, ConnectionReport
from analysis.words import age, utc_clock
from kaobs.episode import (
    ABORT,
    ABORT_DUE,
    ANSWER,
    CUT,
    DEATH_CAUSES,
    FIN,
    FIRST_PROBE_DUE,
    GIVE_UP,
    GIVE_UP_DUE,
    IDLE_CUT,
    LAST_DATA,
    PATH,
    PROBE,
    RESEND,
    RETURN,
    RST,
    STALL,
    STALL_DATA,
    TOLERANCE,
    WINDOW_PROBE,
    Episode,
    build_episode,
    idle_before_death,
    trouble,
)
from kaobs.report import (
    TRIAGE_KINDS,
    Legend,
    backend_words,
    end_words,
    observed_cell,
    finding_words,
    path_lines,
    report_kinds,
    strip_lines,
    summary_line,
    timeline,
)

LANES_PER_KIND = 10
"""Connections drawn per kind of trouble; more are counted in the overview."""
OTHER_LANES = 10
"""Connections without trouble drawn (probing ones first); more are counted."""
PROBLEM_ROWS = 40
"""Rows per kind of trouble in the overview's table (as the text report's triage)."""
GAP_RATIO = 10.0
"""A quiet stretch longer than this many typical gaps between events is drawn short (a break in the axis)."""

LANE_Y = {CLIENT: 2.0, PATH: 1.0, SERVER: 0.0}
SIDE_COLOR = {SERVER: "#1f5fa8", CLIENT: "#2b8a3e", PATH: "#7b3fa0"}
ALARM = "#c92a2a"
STALL_COLOR = "#e8590c"
MUTED = "#666666"
VERDICT_COLOR = {"match": "#2b8a3e", "mismatch": ALARM, "unverified": "#b08900", "no_keepalive": MUTED}
STATUS_CLASS = {"match": "ok", "mismatch": "bad", "unobservable": "unknown"}


# -- the broken time axis -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Gap:
    """A quiet stretch [start, end] (absolute seconds) drawn `width` long instead of end - start."""

    start: float
    end: float
    width: float


@dataclass(slots=True)
class TimeAxis:
    """Absolute time to a position on the page's axis: linear, except across the gaps, which are drawn short.

    Positions are seconds since `origin` outside the gaps, less what the
    gaps before saved; inside a gap, linear across its drawn width.
    """

    origin: float
    gaps: list[Gap] = field(default_factory=list)

    def x(self, t: float) -> float:
        position = t - self.origin
        for gap in self.gaps:
            if t <= gap.start:
                break
            if t < gap.end:
                return position - (t - gap.start) + (t - gap.start) / (gap.end - gap.start) * gap.width
            position -= (gap.end - gap.start) - gap.width
        return position

    def ticks(self, first: float, last: float, count: int = 8) -> dict[float, str]:
        """Tick positions and their labels (time since the origin), a round step in each linear stretch.

        The end of each gap gets a tick of its own, so the time the axis
        resumes at is always written.
        """
        span = max(self.x(last) - self.x(first), 1e-6)
        step = nice_step(span / count)
        out: dict[float, str] = {}
        edges = [gap.end for gap in self.gaps if first < gap.end <= last]
        for edge in edges:
            out[self.x(edge)] = time_label(edge - self.origin, step)
        pieces = []
        start = first
        for gap in self.gaps:
            if gap.end <= first or gap.start >= last:
                continue
            pieces.append((start, max(start, gap.start)))
            start = gap.end
        pieces.append((start, last))
        for low, high in pieces:
            k = math.ceil((low - self.origin) / step - 1e-9)
            while self.origin + k * step <= high + 1e-9:
                t = self.origin + k * step
                x = self.x(t)
                if all(abs(x - other) > 0.45 * step for other in out):
                    out[x] = time_label(t - self.origin, step)
                k += 1
        return dict(sorted(out.items()))


def broken_axis(times: Iterable[float], origin: float, ratio: float = GAP_RATIO) -> TimeAxis:
    """The axis for these moments: gaps much longer than the typical one between them are drawn short.

    The typical gap is the median of those of 10 ms or more (an answer a
    few microseconds after its probe sets no scale). A gap longer than
    `ratio` times that (and than half a second) is drawn
    ``typical * (1 + log10(gap / typical) / 2)`` long: longer gaps still look
    longer, and none squeezes the rest.
    """
    points = sorted(set(times))
    gaps = [(a, b) for a, b in zip(points, points[1:])]
    sizes = [b - a for a, b in gaps if b - a >= 0.010]
    axis = TimeAxis(origin)
    if len(sizes) < 2:
        return axis
    typical = median(sizes)
    for a, b in gaps:
        if b - a > max(ratio * typical, 0.5):
            axis.gaps.append(Gap(a, b, typical * (1 + math.log10((b - a) / typical) / 2)))
    return axis


def nice_step(raw: float) -> float:
    """1, 2 or 5 times a power of ten, at least `raw`."""
    if raw <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if factor * power >= raw - 1e-12:
            return factor * power
    return 10 * power


def time_label(seconds: float, step: float = 1.0) -> str:
    """``+3 s``, ``+2.5 s``, ``+6m40s``, ``+2h00m19s``: time since the connection's first packet."""
    if abs(seconds) < 120:
        decimals = max(0, min(3, -math.floor(math.log10(step)))) if step < 1 else 0
        return f"+{seconds:.{decimals}f} s"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"+{hours}h{minutes:02d}m{secs:02d}s" if hours else f"+{minutes}m{secs:02d}s"


# -- one connection's lanes ------------------------------------------------------------------------------

_MARK_STYLE: dict[str, tuple[str, int, str | None]] = {
    # kind: (marker, size, fill: None = the lane's color)
    LAST_DATA: ("square", 9, "#222222"),
    PROBE: ("circle", 13, None),
    ANSWER: ("circle", 7, None),
    WINDOW_PROBE: ("triangle", 10, "white"),
    ABORT: ("x", 20, None),
    RST: ("x", 16, None),
    FIN: ("diamond", 14, None),
    STALL_DATA: ("square", 11, STALL_COLOR),
    RESEND: ("triangle", 10, STALL_COLOR),
    CUT: ("x", 22, None),
    RETURN: ("star", 15, None),
}
_LABELS = {LAST_DATA: "last data", ABORT: "ABORT", RST: "RST", FIN: "FIN", CUT: "PATH", RETURN: "returns"}
_DEADLINE_STYLE = {FIRST_PROBE_DUE: ("1st probe due", None), ABORT_DUE: ("abort due", ALARM),
                   GIVE_UP_DUE: ("give-up due", STALL_COLOR)}


def _lane_figure(episode: Episode, endpoints: dict[str, str]):
    """The Bokeh figure of one connection: three lanes on a broken time axis, hover on every mark and band."""
    from bokeh.models import (
        BoxAnnotation,
        ColumnDataSource,
        FixedTicker,
        HoverTool,
        Range1d,
    )
    from bokeh.plotting import figure

    index = episode.report.connection.index
    axis = broken_axis(_axis_times(episode), episode.start)
    first = min(episode.times())
    last = max(episode.times())
    left, right = axis.x(first), axis.x(last)
    pad = max((right - left) * 0.05, 0.05)
    plot = figure(name=f"lane-{index}", height=240, sizing_mode="stretch_width", min_border_left=170,
                  x_range=Range1d(left - pad, right + pad), y_range=Range1d(-0.8, 2.75),
                  tools="xpan,xwheel_zoom,xbox_zoom,reset,save", toolbar_location="above", active_drag="xpan",
                  active_scroll=None, output_backend="canvas")
    plot.toolbar.logo = None
    plot.xgrid.grid_line_color = None
    plot.ygrid.grid_line_alpha = 0.35
    plot.yaxis.ticker = FixedTicker(ticks=[0.0, 1.0, 2.0])
    plot.yaxis.major_label_overrides = {LANE_Y[lane]: endpoints[lane] for lane in LANE_Y}
    plot.yaxis.major_label_text_font_size = "11px"
    plot.xaxis.ticker = FixedTicker(ticks=list(axis.ticks(first, last)))
    plot.xaxis.major_label_overrides = axis.ticks(first, last)
    plot.xaxis.axis_label = f"time since the connection's first packet ({utc_clock(episode.start)} UTC)"
    plot.xaxis.axis_label_text_font_size = "11px"
    plot.xaxis.axis_label_text_font_style = "normal"

    bands: dict[str, list[Any]] = {k: [] for k in ("left", "right", "bottom", "top", "color", "alpha", "hatch", "text",
                                                    "when")}

    def band(start: float, end: float, lane: str | None, color: str, alpha: float, hatch: str, text: str) -> None:
        low, high = (-0.5, 2.5) if lane is None else (LANE_Y[lane] - 0.38, LANE_Y[lane] + 0.38)
        x0, x1 = axis.x(start), axis.x(end)
        when = f"{episode.rel(start)} .. {episode.rel(end)}"
        for key, value in zip(bands, (x0, max(x1, x0), low, high, color, alpha, hatch, text, when)):
            bands[key].append(value)

    for gap in axis.gaps:
        band(gap.start, gap.end, None, "#dddddd", 0.45, "/", f"axis broken: {age(gap.end - gap.start)} of nothing "
             "to draw, drawn short")
    for item in episode.bands:
        if item.kind == TOLERANCE:
            band(item.start, item.end, item.lane, SIDE_COLOR[item.lane] if item.ok else ALARM,
                 0.22 if item.ok else 0.35, " ", item.text)
        elif item.kind == STALL:
            band(item.start, item.end, item.lane, STALL_COLOR, 0.12, " ", item.text)
        elif item.kind == GIVE_UP:
            band(item.start, item.end, item.lane, STALL_COLOR, 0.3, "/", item.text)
        elif item.kind == IDLE_CUT:
            band(item.start, item.end, item.lane, SIDE_COLOR[PATH], 0.25, "x", item.text)
    band_renderer = plot.quad(left="left", right="right", bottom="bottom", top="top", fill_color="color",
                              fill_alpha="alpha", hatch_pattern="hatch", hatch_alpha=0.5, hatch_color=MUTED,
                              line_color=None, source=ColumnDataSource(bands), name="bands")

    points: dict[str, list[Any]] = {k: [] for k in ("x", "y", "marker", "size", "fill", "line", "kind", "text",
                                                     "when")}
    links: dict[str, list[float]] = {k: [] for k in ("x0", "y0", "x1", "y1")}
    labels: dict[str, list[Any]] = {k: [] for k in ("x", "y", "text", "color", "away")}
    probe_at: dict[tuple[str, int], float] = {}
    for mark in episode.marks:
        marker, size, fill = _MARK_STYLE[mark.kind]
        color = SIDE_COLOR[mark.lane]
        if mark.kind in (ABORT, RST):
            color = ALARM
        if mark.kind in (RESEND, STALL_DATA):
            color = STALL_COLOR
        if mark.kind == PROBE:
            fill = color if mark.answered else "white"  # filled: answered; hollow: not
            probe_at[(mark.lane, mark.number or 0)] = axis.x(mark.t)
        elif mark.kind == ANSWER:
            fill = color if mark.answered else "white"
            prober = SERVER if mark.lane == CLIENT else CLIENT
            x0 = probe_at.get((prober, mark.number or 0))
            if x0 is not None:
                links["x0"].append(x0)
                links["y0"].append(LANE_Y[prober])
                links["x1"].append(axis.x(mark.t))
                links["y1"].append(LANE_Y[mark.lane])
        x, y = axis.x(mark.t), LANE_Y[mark.lane]
        for key, value in zip(points, (x, y, marker, size, fill or color, color, mark.kind, mark.text,
                                       episode.rel(mark.t))):
            points[key].append(value)
        label = _LABELS.get(mark.kind)
        if label is not None:
            labels["x"].append(x)
            labels["y"].append(y + 0.22)
            labels["away"].append(0.16)  # up, away from its lane
            labels["text"].append(label)
            labels["color"].append(color)
    for deadline in episode.deadlines:
        label, color = _DEADLINE_STYLE[deadline.kind]
        color = color or SIDE_COLOR[deadline.lane]
        x, y = axis.x(deadline.t), LANE_Y[deadline.lane]
        for key, value in zip(points, (x, y - 0.42, "triangle", 9, color, color, deadline.kind,
                                       deadline.text, episode.rel(deadline.t))):
            points[key].append(value)
        labels["x"].append(x)
        labels["y"].append(y - 0.62)  # under the lane, clear of the marks' own labels
        labels["away"].append(-0.14)
        labels["text"].append(label)
        labels["color"].append(color)
        plot.segment(x0=[x], y0=[y - 0.42], x1=[x], y1=[y + 0.42], line_dash="dashed", line_width=1.5,
                     line_color=color, name=deadline.kind)
    for gap in axis.gaps:
        labels["x"].append((axis.x(gap.start) + axis.x(gap.end)) / 2)
        labels["y"].append(2.55)
        labels["away"].append(0.12)
        labels["text"].append(f"\u2248 {age(gap.end - gap.start)}")
        labels["color"].append(MUTED)
    _spread(labels, min_distance=(right - left) * 0.1)
    plot.segment(x0="x0", y0="y0", x1="x1", y1="y1", source=ColumnDataSource(links), line_color="#999999",
                 line_width=1, name="answers")
    point_renderer = plot.scatter(x="x", y="y", marker="marker", size="size", fill_color="fill", line_color="line",
                                  line_width=2, source=ColumnDataSource(points), name="points")
    plot.text(x="x", y="y", text="text", text_color="color", text_font_size="10px", text_align="align",
              text_baseline="bottom", source=ColumnDataSource(labels), name="labels")
    plot.add_layout(BoxAnnotation(bottom=0.62, top=1.38, fill_color=SIDE_COLOR[PATH], fill_alpha=0.04,
                                  line_color=None))
    plot.add_tools(HoverTool(renderers=[point_renderer, band_renderer], tooltips="<b>@when</b> @text",
                             point_policy="snap_to_data"))
    return plot


def _spread(labels: dict[str, list[Any]], min_distance: float) -> None:
    """Labels on one line closer than `min_distance`: the first leans left, the next right; a third one in the
    same cluster moves a line away from its lane (up above a lane, down below one), so none hides another."""
    labels["align"] = ["center"] * len(labels["x"])
    order = sorted(range(len(labels["x"])), key=lambda i: (round(labels["y"][i], 3), labels["x"][i]))
    previous: int | None = None
    for i in order:
        if previous is not None and labels["y"][previous] == labels["y"][i] \
                and labels["x"][i] - labels["x"][previous] < min_distance:
            if labels["align"][previous] == "center":
                labels["align"][previous], labels["align"][i] = "right", "left"
            else:
                labels["y"][i] += labels["away"][i]
                continue
        previous = i


def _axis_times(episode: Episode) -> list[float]:
    """The moments that set the axis's scale: marks, deadlines, the connection's span (not the bands' edges)."""
    return [episode.start, episode.end, *(m.t for m in episode.marks), *(d.t for d in episode.deadlines)]


# -- the page --------------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 24px 40px;color:#1b1b1b;max-width:1600px}
h1{font-size:20px;margin:18px 0 4px}h2{font-size:16px;margin:0 0 4px}
.muted{color:#666}.ok{color:#2b8a3e}.bad{color:#c92a2a;font-weight:600}.unknown{color:#8a6d00}
.verdict-match{color:#2b8a3e}.verdict-mismatch{color:#c92a2a}.verdict-unverified{color:#8a6d00}
.verdict-no_keepalive{color:#666}
section.conn{border-top:1px solid #ddd;padding-top:12px;margin-top:16px}
.row{display:flex;gap:18px;align-items:flex-start}.lane{flex:1 1 auto;min-width:560px;min-height:262px}
.histogram{min-height:262px;max-width:760px}
aside{flex:0 0 430px;font-size:13px}
table{border-collapse:collapse;font-size:13px}td,th{padding:1px 8px 1px 0;text-align:left;vertical-align:top}
pre{font:12px/1.35 ui-monospace,"DejaVu Sans Mono",monospace;margin:4px 0;white-space:pre-wrap}
pre.strip{font-size:13px;background:#f6f6f6;padding:4px 6px;display:inline-block}
.legend span{margin-right:14px}ul.words{margin:4px 0;padding-left:18px}
details summary{cursor:pointer;color:#444}
"""

_LEGEND = (
    "<p class=\"legend muted\"><span>\u25cf probe answered</span><span>\u25cb probe unanswered</span>"
    "<span>\u25a0 last packet before the idle</span><span>\u2715 abort / RST / the path's cut</span>"
    "<span>\u25c6 FIN</span><span>\u25b2 retransmission</span><span>shaded: the window the verdict allowed a "
    "timer</span><span>dashed: what the settings predict</span><span>hatched grey: the axis broken over "
    "a quiet stretch</span></p>"
)

_BINS_PER_DECADE = 12
_BIN_FLOOR = 0.01
"""Histogram bins: 12 per decade from 10 ms: fixed, so every connection can be counted as it streams by."""


class IdleHistogram:
    """How long connections had been idle when they were found dead, by cause, in fixed log-spaced bins."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[int, int]] = {cause: {} for cause in DEATH_CAUSES}
        self.total = 0
        self.last: tuple[str, float] | None = None

    def add(self, report: ConnectionReport) -> None:
        death = idle_before_death(report)
        if death is None:
            return
        cause, idle = death
        self.last = (cause, idle)
        slot = math.floor(math.log10(max(idle, _BIN_FLOOR) / _BIN_FLOOR) * _BINS_PER_DECADE + 1e-9)
        self.counts[cause][slot] = self.counts[cause].get(slot, 0) + 1
        self.total += 1

    @staticmethod
    def edges(slot: int) -> tuple[float, float]:
        return (_BIN_FLOOR * 10 ** (slot / _BINS_PER_DECADE), _BIN_FLOOR * 10 ** ((slot + 1) / _BINS_PER_DECADE))

    def figure(self, idle_cut: IdleCut | None):
        from bokeh.models import BoxAnnotation, ColumnDataSource, HoverTool
        from bokeh.plotting import figure

        slots = sorted({slot for counts in self.counts.values() for slot in counts})
        low = self.edges(slots[0])[0] / 2
        high = self.edges(slots[-1])[1] * 2
        plot = figure(name="idle-before-death", height=230, width=720, x_axis_type="log", x_range=(low, high),
                      tools="xpan,xwheel_zoom,reset,save", toolbar_location="above", active_scroll=None)
        plot.toolbar.logo = None
        plot.xaxis.axis_label = "idle before death (s): silence before the packet that found the connection dead"
        plot.yaxis.axis_label = "connections"
        colors = {"keepalive abort": ALARM, "path reset": SIDE_COLOR[PATH], "path drop": "#b197fc",
                  "stall given up": STALL_COLOR}
        bottoms: dict[int, int] = {}
        renderers = []
        for cause in DEATH_CAUSES:
            counts = self.counts[cause]
            if not counts:
                continue
            data: dict[str, list[Any]] = {k: [] for k in ("left", "right", "bottom", "top", "text")}
            for slot, count in sorted(counts.items()):
                left, right = self.edges(slot)
                bottom = bottoms.get(slot, 0)
                bottoms[slot] = bottom + count
                for key, value in zip(data, (left, right, bottom, bottom + count,
                                             f"{count} {cause} after {age(left)}-{age(right)} idle")):
                    data[key].append(value)
            renderers.append(plot.quad(left="left", right="right", bottom="bottom", top="top",
                                       fill_color=colors[cause], line_color="white", source=ColumnDataSource(data),
                                       legend_label=cause))
        if idle_cut is not None:
            plot.add_layout(BoxAnnotation(left=idle_cut.lower, right=idle_cut.upper, fill_color=SIDE_COLOR[PATH],
                                          fill_alpha=0.12, line_color=None))
        plot.legend.location = "top_left"
        plot.legend.label_text_font_size = "11px"
        plot.add_tools(HoverTool(renderers=renderers, tooltips="@text"))
        return plot


def _figure_html(model, target: str, css_class: str) -> str:
    """A figure's place in the page and its document as JSON, drawn when it scrolls into view (`_DRAW_JS`).

    `json_item` is Bokeh's own serialisation for that; ``</`` is escaped so
    no text in the figure can close its script element.
    """
    from bokeh.embed import json_item

    payload = json.dumps(json_item(model, target), separators=(",", ":")).replace("</", "<\\/")
    return (f"<div class=\"{css_class}\" id=\"{target}\"></div>"
            f"<script type=\"application/json\" class=\"bokeh-item\" data-target=\"{target}\">{payload}</script>")


_DRAW_JS = """<script>
(function () {
  // Each figure is drawn when it comes near the screen: a page of many connections opens at once.
  var observer = new IntersectionObserver(function (entries) {
    entries.forEach(function (entry) {
      if (!entry.isIntersecting) return;
      observer.unobserve(entry.target);
      var item = document.querySelector('script.bokeh-item[data-target="' + entry.target.id + '"]');
      Bokeh.embed.embed_item(JSON.parse(item.textContent), entry.target.id);
    });
  }, {rootMargin: "400px 0px"});
  document.querySelectorAll("script.bokeh-item").forEach(function (item) {
    observer.observe(document.getElementById(item.dataset.target));
  });
})();
</script>
"""


class HtmlReport:
    """The page, built as reports stream by (`add`), written to `file` by `finish`.

    Every report is counted; lanes are rendered only for the connections
    the page will show (see the module docstring) and kept on temporary
    files, one per kind of trouble, so the troubled come first in the page.
    """

    def __init__(self, file: str, title: str = "kaobs", path_summary: PathSummary | None = None,
                 postgres: PostgresView | None = None, lanes_per_kind: int = LANES_PER_KIND,
                 other_lanes: int = OTHER_LANES) -> None:
        self.file = file
        self.title = title
        self.known_path = path_summary
        """The path across every connection, when the caller gathered it before judging (analyze does)."""
        self.postgres = postgres
        self.lanes_per_kind = lanes_per_kind
        self.other_lanes = other_lanes
        self.path = PathSummary()
        self.counts = dict.fromkeys(VERDICTS, 0)
        self.total = 0
        self.histogram = IdleHistogram()
        self.kind_counts = dict.fromkeys(TRIAGE_KINDS, 0)
        self.problem_rows: dict[str, list[tuple[int, str, str]]] = {kind: [] for kind in TRIAGE_KINDS}
        self.spools: dict[str, IO[str]] = {}
        self.drawn: dict[str, int] = dict.fromkeys([*TRIAGE_KINDS, "other"], 0)
        self.drawn_ids: set[int] = set()
        self.quiet_waiting: list[ConnectionReport] = []

    # -- streaming ------------------------------------------------------------------------------------

    def tee(self, reports: Iterable[ConnectionReport]) -> Iterator[ConnectionReport]:
        """The reports as they come, each one added to the page on the way."""
        for report in reports:
            self.add(report)
            yield report

    def add(self, report: ConnectionReport) -> None:
        self.total += 1
        self.counts[report.verdict] += 1
        self.path.add(report.connection, report.path_cut)
        self.histogram.add(report)
        kind = trouble(report, self.postgres)
        group = kind or "other"
        if kind is not None:
            self.kind_counts[kind] += 1
            if len(self.problem_rows[kind]) < PROBLEM_ROWS:
                self.problem_rows[kind].append((report.connection.index, report.verdict,
                                                summary_line(report, self.postgres).plain))
        limit = self.lanes_per_kind if kind is not None else self.other_lanes
        if self.drawn[group] >= limit:
            return
        if kind is None and not report_kinds(report, self.postgres) and report.verdict == "no_keepalive":
            if len(self.quiet_waiting) < self.other_lanes:
                self.quiet_waiting.append(report)  # drawn at the end if no probing connection takes its place
            return
        self._draw(report, group)

    def _draw(self, report: ConnectionReport, group: str) -> None:
        spool = self.spools.get(group)
        if spool is None:
            spool = self.spools[group] = tempfile.TemporaryFile("w+", encoding="utf-8", prefix="kaobs-html-")
        spool.write(self._section(report))
        self.drawn[group] += 1
        self.drawn_ids.add(report.connection.index)

    def _idle_cut(self, report: ConnectionReport) -> IdleCut | None:
        summary = self.known_path or self.path
        cut = summary.idle_cut()
        conn = report.connection
        if cut is None or cut.hosts != (conn.client.address, conn.server.address):
            return None
        return cut

    def _section(self, report: ConnectionReport) -> str:
        conn = report.connection
        episode = build_episode(report, self._idle_cut(report))
        endpoints = {CLIENT: f"client kernel {conn.client.endpoint}", PATH: "the path",
                     SERVER: f"server kernel {conn.server.endpoint}"}
        figure = _figure_html(_lane_figure(episode, endpoints), f"lane-{conn.index}", "lane")
        probes = sum(len(side.probes) for side in (report.server, report.client))
        backend = backend_words(self.postgres, conn.index)
        head = (f"<h2>#{conn.index} <span class=\"verdict-{report.verdict}\">{report.verdict.upper()}</span> "
                f"{_e(conn.client.endpoint)} \u2192 {_e(conn.server.endpoint)}"
                + (f" <span class=\"muted\">{_e(backend)}</span>" if backend else "") + "</h2>")
        span = (f"<div class=\"muted\">{utc_clock(conn.start)} .. {utc_clock(conn.end)} UTC "
                f"({conn.end - conn.start:.3f} s), {_e(end_words(conn.end_reason))}</div>")
        return (f"<section class=\"conn\" id=\"c{conn.index}\" data-connection=\"{conn.index}\" "
                f"data-verdict=\"{report.verdict}\" data-probes=\"{probes}\">{head}{span}"
                f"<div class=\"row\">{figure}<aside>{self._findings(report)}</aside></div></section>\n")

    def _findings(self, report: ConnectionReport) -> str:
        """Beside the lanes: the strip, the verdict's findings with the settings and where they came from."""
        parts = []
        strips = strip_lines(report)
        if strips:
            parts.append(f"<pre class=\"strip\">{_e(chr(10).join(strips))}</pre>")
        rows = []
        words = []
        legend = Legend()
        notes = []
        for side in (report.server, report.client):
            for finding in side.findings:
                status = finding.status
                mark, new = legend.mark(finding.source)
                if new:
                    notes.append(f"<div class=\"muted\">{_e(mark.strip())} {_e(finding.source)}</div>")
                rows.append(f"<tr><td class=\"{STATUS_CLASS[status]}\">{status}</td><td>{side.role}</td>"
                            f"<td>{_e(finding.setting)}</td><td>{_e(finding.value_text + mark)}</td>"
                            f"<td>{_e(observed_cell(side, finding))}</td></tr>")
                said = finding_words(report, side, finding)
                if said is not None:
                    words.append(f"<li class=\"{STATUS_CLASS[status]}\">{side.role} {_e(finding.setting)}: "
                                 f"{_e(said)}</li>")
        if rows:
            parts.append("<table><tr><th>status</th><th>side</th><th>setting</th><th>expected</th>"
                         "<th>observed</th></tr>" + "".join(rows) + "</table>" + "".join(notes))
        else:
            observed = []
            for side in (report.server, report.client):
                o = side.observed
                if side.probes or side.abort:
                    observed.append(f"<li>{side.role}: observed idle {_s(o.idle)}, interval {_s(o.interval)}, "
                                    f"count {o.count if o.count is not None else '-'} (no expectation given: not "
                                    "judged)</li>")
            if observed:
                words = observed + words
            else:
                words.append("<li class=\"muted\">no expectation given, nothing judged</li>")
        if words:
            parts.append(f"<ul class=\"words\">{''.join(words)}</ul>")
        events = timeline(report)
        if events:
            parts.append(f"<details><summary>events ({len(events)})</summary><pre>{_e(chr(10).join(events))}</pre>"
                         "</details>")
        return "".join(parts)

    # -- the page -------------------------------------------------------------------------------------

    def finish(self, run: AnalysisRun, expectations: Expectations | None) -> int:
        """Write the page: head, overview, the drawn connections (troubled first); returns how many were drawn."""
        for report in self.quiet_waiting:
            if self.drawn["other"] >= self.other_lanes:
                break
            self._draw(report, "other")
        self.quiet_waiting.clear()
        with open(self.file, "w", encoding="utf-8") as out:
            self._write(out, run, expectations)
        return sum(self.drawn.values())

    def _write(self, out: IO[str], run: AnalysisRun, expectations: Expectations | None) -> None:
        from bokeh.resources import Resources

        out.write("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                  f"<title>{_e(self.title)}</title><style>{_CSS}</style>\n")
        out.write(Resources(mode="inline", components=["bokeh"]).render_js())
        out.write("\n</head><body>\n")
        out.write(self._overview(run, expectations))
        for group in (*TRIAGE_KINDS, "other"):
            spool = self.spools.get(group)
            if spool is None:
                continue
            spool.seek(0)
            shutil.copyfileobj(spool, out)
            spool.close()
        self.spools.clear()
        out.write(_DRAW_JS)
        out.write("</body></html>\n")

    def _overview(self, run: AnalysisRun, expectations: Expectations | None) -> str:
        parts = [f"<h1>{_e(self.title)}</h1>"]
        span = ""
        if run.capture_start is not None and run.capture_end is not None:
            span = (f", {utc_clock(run.capture_start)} .. {utc_clock(run.capture_end)} UTC "
                    f"({age(run.capture_end - run.capture_start)})")
        parts.append(f"<div class=\"muted\">{_e(', '.join(run.sources))}: {run.packets} packets, {run.segments} "
                     f"TCP segments{span}</div>")
        verdicts = ", ".join(f"<span class=\"verdict-{v}\">{n} {v}</span>" for v, n in self.counts.items() if n)
        parts.append(f"<p><b>{self.total} connection(s)</b>{': ' + verdicts if verdicts else ''}</p>")
        for warning in run.warnings:
            parts.append(f"<p class=\"unknown\">warning: {_e(warning)}</p>")
        for line, _style in path_lines(self.path, expectations):
            if line:
                parts.append(f"<div>{_e(line)}</div>")
        problems = sum(self.kind_counts.values())
        if problems:
            rows = []
            for kind in TRIAGE_KINDS:
                for index, verdict, line in self.problem_rows[kind]:
                    link = f"<a href=\"#c{index}\">#{index}</a>" if index in self.drawn_ids else f"#{index}"
                    rows.append(f"<tr><td>{link}</td><td>{kind}</td><td class=\"verdict-{verdict}\">"
                                f"{verdict.upper()}</td><td>{_e(line.split(': ', 1)[-1])}</td></tr>")
                more = self.kind_counts[kind] - len(self.problem_rows[kind])
                if more:
                    rows.append(f"<tr><td></td><td>{kind}</td><td colspan=\"2\" class=\"muted\">... and {more} "
                                f"more (kaobs analyze --only {'abort' if kind == 'outlived' else kind} --summary "
                                "lists them)</td></tr>")
            parts.append(f"<h2>Problems, worst first ({problems})</h2><table>{''.join(rows)}</table>")
        if self.histogram.total == 1 and self.histogram.last is not None:
            cause, idle = self.histogram.last
            parts.append(f"<p>Idle before death: one connection, {cause} after {age(idle)} idle.</p>")
        elif self.histogram.total:
            figure = _figure_html(self.histogram.figure((self.known_path or self.path).idle_cut()), "idle-before-death",
                                  "histogram")
            parts.append(f"<h2>Idle before death ({self.histogram.total} connection(s))</h2>"
                         "<div class=\"muted\">Many connections dying after the same idle are a middlebox's "
                         f"idle timeout.</div>{figure}")
        drawn = sum(self.drawn.values())
        if self.total:
            left = self.total - drawn
            note = f"{drawn} connection(s) drawn below, the troubled ones first"
            if left:
                note += (f"; {left} more counted above and not drawn (at most {self.lanes_per_kind} of each "
                         f"kind of problem and {self.other_lanes} others are drawn)")
            parts.append(f"<p class=\"muted\">{_e(note)}. Drag to pan, use the toolbar to zoom, hover for "
                         "details.</p>" + _LEGEND)
        else:
            parts.append("<p>No Postgres connection in the capture.</p>")
        return f"<section id=\"overview\">{''.join(parts)}</section>\n"


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def write_html(file: str, run: AnalysisRun, reports: Iterable[ConnectionReport],
               expectations: Expectations | None, title: str = "kaobs", postgres: PostgresView | None = None) -> int:
    """The whole page for a list (or stream) of reports; returns how many connections were drawn."""
    page = HtmlReport(file, title, postgres=postgres)
    for report in reports:
        page.add(report)
    return page.finish(run, expectations)

