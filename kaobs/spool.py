"""A temporary file that holds ended connections, so memory stays bounded whatever their number.

A capture of an app that opens a connection per request holds hundreds of
thousands of connections; keeping each one (endpoints, probes, quiet spans)
in memory until the report is written grew `kaobs analyze` past 150 MB. A
retiring `KeepaliveModel` hands ended connections to a `ConnectionSpool` (a
`RetiredStore`), which pickles each onto disk and keeps only its offset and
length (16 bytes); `analysis.pipeline.Analysis.connections` then reads them
back one at a time, in index order.
"""
from __future__ import annotations

import pickle
import tempfile
from array import array

from analysis.model import Connection


class ConnectionSpool:
    """Connections by index on a temporary file (a `RetiredStore`); removed when closed."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="kaobs-spool-")
        self._offsets = array("q")
        self._lengths = array("q")  # 0: no connection of that index here
        self._end = 0
        self.count = 0

    def put(self, conn: Connection) -> None:
        blob = pickle.dumps(conn, pickle.HIGHEST_PROTOCOL)
        slot = conn.index - 1
        missing = slot + 1 - len(self._offsets)
        if missing > 0:
            self._offsets.extend([0] * missing)
            self._lengths.extend([0] * missing)
        if not self._lengths[slot]:
            self.count += 1
        self._file.seek(self._end)
        self._file.write(blob)
        self._offsets[slot] = self._end
        self._lengths[slot] = len(blob)
        self._end += len(blob)

    def get(self, index: int) -> Connection:
        slot = index - 1
        self._file.seek(self._offsets[slot])
        return pickle.loads(self._file.read(self._lengths[slot]))

    def holds(self, index: int) -> bool:
        slot = index - 1
        return slot < len(self._lengths) and self._lengths[slot] > 0

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "ConnectionSpool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ReportSpool:
    """Judged reports (`ConnectionReport`s) of connections that left a live model, on a temporary file.

    `kaobs watch` judges a connection as it retires and keeps nothing of it
    in memory but 16 bytes here (its index and where its pickle starts), so
    a run of weeks holds only its open connections; `reports` reads them
    back in index order, as often as asked.
    """

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="kaobs-reports-")
        self._indexes = array("q")
        self._offsets = array("q")
        self._end = 0
        self._sorted = True

    def __len__(self) -> int:
        return len(self._indexes)

    def put(self, report) -> None:
        blob = pickle.dumps(report, pickle.HIGHEST_PROTOCOL)
        index = report.connection.index
        if self._indexes and index < self._indexes[-1]:
            self._sorted = False  # a connection that lived longer retired after later ones
        self._file.seek(self._end)
        self._file.write(blob)
        self._indexes.append(index)
        self._offsets.append(self._end)
        self._end += len(blob)

    def order(self) -> array:
        """Positions of the reports in index order (8 bytes each, made when asked)."""
        if self._sorted:
            return array("q", range(len(self._indexes)))
        return array("q", sorted(range(len(self._indexes)), key=self._indexes.__getitem__))

    def index_at(self, position: int) -> int:
        return self._indexes[position]

    def load(self, position: int):
        self._file.seek(self._offsets[position])
        end = self._offsets[position + 1] if position + 1 < len(self._offsets) else self._end
        return pickle.loads(self._file.read(end - self._offsets[position]))

    def close(self) -> None:
        self._file.close()
