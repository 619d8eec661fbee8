"""The analysis pipeline that `kaobs analyze`, `kaobs watch` and `kaobs lab` share: records in, judged connections out.

`Analysis` feeds the keepalive model with records (from files, the live ring
or socket, whatever the source), and at the end judges every connection it
followed against the expectations, one at a time and in order. With a
`RetiredStore` (a place for ended connections, `kaobs.spool` puts them on a
temporary file) memory stays bounded by the connections alive at a time,
whatever their number. `AnalysisRun` holds what the reports say about the
input itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

from analysis.expect import Expectations
from analysis.model import Connection, KeepaliveModel, ModelEvent, RetiredStore
from analysis.path import PathSummary, path_cut
from analysis.tolerance import DEFAULT_HZ
from analysis.verdict import VERDICTS, ConnectionReport, judge_connection
from sniffer.records import Record, TcpSegment, flow_endpoints


@dataclass(slots=True)
class AnalysisRun:
    """Everything a report needs besides the connections."""

    sources: list[str]
    packets: int = 0
    segments: int = 0
    duplicates: int = 0
    ignored_segments: int = 0
    capture_start: float | None = None
    capture_end: float | None = None
    warnings: list[str] = field(default_factory=list)
    hz: int = DEFAULT_HZ
    kernel_drops: int | None = None
    """Live capture only: packets the kernel dropped before kaobs could read them (None for files)."""
    capture_path: str | None = None
    """Live capture only: how packets were read ("ring": mmap'd TPACKET_V3 ring, "socket": recvmsg per packet)."""
    filter: dict | None = None
    """The user's filter: {"expression", "since", "until", "filtered_out"} (filtered_out None live: the kernel filtered)."""
    cut_by_snaplen: int = 0
    """Packets a snaplen cut before their TCP header: not analysed (a warning says the snaplen to use)."""
    untimed_packets: int = 0
    """Packets without a timestamp (pcapng Simple Packet Blocks): not analysed, their connections not judged."""
    unsupported_packets: int = 0
    """Packets on pcapng interfaces of a link type kaobs does not read: skipped."""
    time_backwards: int = 0
    """Packets whose time is earlier than one before them in the same file."""


class Analysis:
    """The model over one capture, and the judging of what it followed.

    `retired`, when given, receives connections that ended and went quiet
    (see `KeepaliveModel`); `reports` then reads them back in order.
    """

    def __init__(self, ports: Iterable[int] = (5432,), *, retired: RetiredStore | None = None,
                 on_event: Callable[[ModelEvent], None] | None = None, hz: int = DEFAULT_HZ,
                 revive: bool = True, linger: float = 5.0, linger_after_abort: float | None = None) -> None:
        self.path = PathSummary()
        """The path across connections (the idle cut), gathered before any is judged: the verdicts need it."""
        self.model = KeepaliveModel(ports, on_event=on_event, retired=retired, on_retire=self._note_path,
                                    revive=revive, linger=linger, linger_after_abort=linger_after_abort)
        self.retired = retired
        self.hz = hz
        self._live_noted = False
        self.untimed: set[tuple[str, int, str, int]] = set()
        """(src, sport, dst, dport) of packets that had no timestamp: their connections are not judged."""

    def _note_path(self, conn: Connection) -> None:
        self.path.add(conn, path_cut(conn, conn.start))

    def note_untimed(self, flows: Iterable[bytes]) -> None:
        """Flows (record flow keys) with packets that could not be timed (pcapng Simple Packet Blocks)."""
        self.untimed.update(flow_endpoints(flow) for flow in flows)

    def feed(self, records: Iterable[Record]) -> None:
        self.model.feed_records(records)

    def finish(self, end_t: float | None = None) -> None:
        self.model.finish(end_t)

    @property
    def capture_end(self) -> float:
        model = self.model
        return model.capture_end if model.capture_end is not None else (model.last_t or 0.0)

    def connections(self) -> Iterator[Connection]:
        """Every connection followed, by index: the live ones from the model, the others from the store.

        A live connection wins over a stored copy (one taken back after it was
        retired, and still live).
        """
        model, store = self.model, self.retired
        live = {conn.index: conn for conn in model.connections}
        for index in range(1, model.opened + 1):
            conn = live.get(index)
            if conn is None and store is not None and store.holds(index):
                conn = store.get(index)
            if conn is not None:
                yield conn

    def reports(self, expectations: Expectations | None, capture_end: float | None = None,
                idle_cut: float | None = None,
                expectations_for: Callable[[Connection], Expectations | None] | None = None,
                ) -> Iterator[ConnectionReport]:
        """Each connection judged as of `capture_end` (default: the end of the capture), one at a time.

        `expectations_for` gives a connection expectations of its own (a
        session's own settings); where it gives None, `expectations` apply.
        """
        if not self._live_noted:  # the retired ones were noted as they left
            self._live_noted = True
            for conn in self.model.connections:
                self._note_path(conn)
        return judge_in_order(self.connections(), expectations,
                              self.capture_end if capture_end is None else capture_end, self.hz, idle_cut, self.path,
                              expectations_for, self.untimed)


def judge_in_order(connections: Iterable[Connection], expectations: Expectations | None, capture_end: float,
                   hz: int = DEFAULT_HZ, idle_cut: float | None = None,
                   path: PathSummary | None = None,
                   expectations_for: Callable[[Connection], Expectations | None] | None = None,
                   untimed: set[tuple[str, int, str, int]] = frozenset(),
                   ) -> Iterator[ConnectionReport]:
    """Judge connections one at a time against the expectations of both sides.

    `idle_cut` is an idle timeout of the path the user knows of; `path` what
    the capture shows of it across connections (a connection silent longer
    than the path keeps connections is not seen beyond that). A connection
    with packets that could not be timed (in `untimed`) is shown as it was
    seen but judged against nothing: what is missing from its timeline could
    be any probe.
    """
    for conn in connections:
        own = expectations_for(conn) if expectations_for is not None else None
        chosen = own if own is not None else expectations
        server = chosen.server if chosen is not None else None
        client = chosen.client if chosen is not None else None
        if untimed and _has_untimed(conn, untimed):
            server = client = None
        forgets = path.forgets_after(conn.client.address, conn.server.address) if path is not None else None
        yield judge_connection(conn, server, client, capture_end, hz, idle_cut, forgets)


def _has_untimed(conn: Connection, untimed: set[tuple[str, int, str, int]]) -> bool:
    s, c = conn.server, conn.client
    return (c.address, c.port, s.address, s.port) in untimed or (s.address, s.port, c.address, c.port) in untimed


def tally(reports: Iterable[ConnectionReport]) -> dict[str, int]:
    """How many connections got each verdict, in the order the reports list them."""
    counts = dict.fromkeys(VERDICTS, 0)
    for report in reports:
        counts[report.verdict] += 1
    return counts


def analyze_segments(segments: Iterable[TcpSegment], expectations: Expectations | None,
                     server_ports: Sequence[int] = (5432,), hz: int = DEFAULT_HZ
                     ) -> tuple[KeepaliveModel, list[ConnectionReport]]:
    """The model over a finished stream of TcpSegments, and its judged connections (for tests and tools)."""
    analysis = Analysis(server_ports, hz=hz)
    analysis.model.feed_all(segments)
    analysis.finish()
    return analysis.model, list(analysis.reports(expectations))
