"""Progress of a long `kaobs analyze` on stderr: packets/s, % of the files read, time left.

Shown only when stderr is a terminal (and not with --quiet): a pipe, a log
or CI get nothing. It is rich's own progress display (`rich.progress`, a
dependency already), transient: it disappears when the work is done, so the
terminal keeps only the report.

The readers in `sniffer` own their files and say nothing about how far they
are; the share of a file read is its descriptor's offset (`os.lseek` on the
descriptor `/proc/self/fd` shows open on that path), asked between batches
of records, never per packet. Where that cannot be found, the display shows
the packets and their rate without a percentage.
"""
from __future__ import annotations

import os
import time
from itertools import islice
from typing import Iterable, Iterator, Sequence, TypeVar

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn, TimeRemainingColumn

from analysis.pipeline import Analysis
from sniffer.records import Record

BATCH = 8192
"""Records fed to the model between two looks at the clock and the file offset (~10 ms of work)."""

T = TypeVar("T")


class AnalyzeProgress:
    """The progress of reading capture files, then of writing the report; a no-op when not `enabled`."""

    def __init__(self, paths: Sequence[str], console: Console, enabled: bool) -> None:
        self.enabled = enabled
        self.console = console
        self.sizes = [_size(path) for path in paths]
        self.total = sum(self.sizes)
        self.done_bytes = 0
        self.records = 0
        self.started = time.monotonic()
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> "AnalyzeProgress":
        if self.enabled:
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                console=self.console, transient=True)
            self._progress.start()
            self._task = self._progress.add_task("reading", total=self.total or None, rate="")
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def feed(self, analysis: Analysis, records: Iterable[Record], path: str, index: int) -> None:
        """Feed `records` (of the `index`-th file, `path`) to `analysis`, updating the display between batches."""
        if self._progress is None:
            analysis.feed(records)
            return
        iterator = iter(records)
        position = _Offset(path)
        base = self.done_bytes
        name = os.path.basename(path)
        while True:
            batch = list(islice(iterator, BATCH))
            if batch:
                analysis.feed(batch)
                self.records += len(batch)
            if len(batch) < BATCH:
                break
            offset = position()  # the reader is suspended mid-file: its file is open
            self._show(f"reading {name}", None if offset is None else base + offset)
        self.done_bytes = base + self.sizes[index]
        self._show(f"reading {name}", self.done_bytes)

    def _show(self, description: str, completed: int | None) -> None:
        assert self._progress is not None and self._task is not None
        elapsed = max(time.monotonic() - self.started, 1e-6)
        fields = {"description": description, "rate": f"{self.records:,} packets, {self.records / elapsed:,.0f}/s"}
        if completed is not None:
            fields["completed"] = min(completed, self.total)
        self._progress.update(self._task, **fields)

    def counting(self, reports: Iterable[T], connections: int) -> Iterator[T]:
        """`reports` unchanged, the display counting them (for a report that goes to a file, not this terminal)."""
        if self._progress is None:
            yield from reports
            return
        progress = self._progress
        assert self._task is not None
        progress.reset(self._task, total=connections or None, description="writing the report",
                       rate=f"{connections:,} connections")
        for n, report in enumerate(reports, 1):
            if n % 256 == 0:
                progress.update(self._task, completed=n)
            yield report


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


class _Offset:
    """How far this process has read `path`: the offset of the descriptor open on it, found once."""

    def __init__(self, path: str) -> None:
        self.target = os.path.realpath(path)
        self.fd: int | None = None
        self.searched = False

    def __call__(self) -> int | None:
        if self.fd is None and not self.searched:
            self.searched = True
            self.fd = _descriptor_of(self.target)
        if self.fd is None:
            return None
        try:
            return os.lseek(self.fd, 0, os.SEEK_CUR)
        except OSError:
            self.fd = None
            return None


def _descriptor_of(target: str) -> int | None:
    try:
        entries = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for entry in entries:
        try:
            if os.readlink(f"/proc/self/fd/{entry}") == target:
                return int(entry)
        except (OSError, ValueError):
            continue
    return None
