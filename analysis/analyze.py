"""The pipeline shared by `kaobs analyze` and `kaobs watch`: segments in, reports out."""
from __future__ import annotations

from typing import Iterable, Iterator

from analysis.expect import Expectations
from analysis.model import Connection, KeepaliveModel
from analysis.timers import DEFAULT_HZ
from analysis.verdict import ConnectionReport, judge_connection
from sniffer.records import TcpSegment


def judge_all(
    model: KeepaliveModel,
    expectations: Expectations | None,
    capture_end: float | None = None,
    hz: int = DEFAULT_HZ,
) -> list[ConnectionReport]:
    """Judge every connection the model followed, as of `capture_end`."""
    end = capture_end if capture_end is not None else (model.last_t or 0.0)
    server = expectations.server if expectations is not None else None
    client = expectations.client if expectations is not None else None
    return [judge_connection(conn, server, client, end, hz) for conn in model.connections]


def judge_in_order(
    connections: Iterable[Connection],
    expectations: Expectations | None,
    capture_end: float,
    hz: int = DEFAULT_HZ,
) -> Iterator[ConnectionReport]:
    """`judge_all` one connection at a time (with a retiring model and `analysis.spool`)."""
    server = expectations.server if expectations is not None else None
    client = expectations.client if expectations is not None else None
    for conn in connections:
        yield judge_connection(conn, server, client, capture_end, hz)


def analyze_segments(
    segments: Iterable[TcpSegment],
    expectations: Expectations | None,
    server_ports: Iterable[int] = (5432,),
    hz: int = DEFAULT_HZ,
) -> tuple[KeepaliveModel, list[ConnectionReport]]:
    """Run the model over a finished stream of segments and judge the result."""
    model = KeepaliveModel(server_ports)
    model.feed_all(segments)
    model.finish()
    return model, judge_all(model, expectations, model.capture_end, hz)
