#!/usr/bin/env python3
"""What `--metrics` costs: the live pipeline with and without it, the scrape's size and time.

``python3 bench/bench_metrics.py [--packets 400000] [--mix short] [--repeat 3]``

Builds a capture with `make_capture.py` (in /tmp/kaobs-bench/), reads its
records once into memory, then feeds them to the analysis as `run_live`
does: in batches, the model's events to the metrics (`on_event`), the
capture counters and open connections every 0.25 s of capture time
(`on_tick`), and each connection's final report to `on_judged`. The same
work without metrics is the yardstick. Then the scrape: the exposition's
bytes and series for that capture, and for 1, 10 and 100 servers (the
per-server series are what grows), and the time `generate_latest` takes.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prometheus_client import generate_latest  # noqa: E402

from analysis.expect import build_expectations  # noqa: E402
from analysis.model import ModelEvent  # noqa: E402
from analysis.pipeline import Analysis  # noqa: E402
from kaobs.metrics import WatchMetrics  # noqa: E402
from sniffer.capture import LiveStats  # noqa: E402
from sniffer.pcapfile import CaptureReader  # noqa: E402

BATCH = 256
EXPECT = ("tcp_keepalives_idle=2", "tcp_keepalives_interval=1", "tcp_keepalives_count=3")


def capture(packets: int, mix: str) -> str:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import make_capture

    os.makedirs("/tmp/kaobs-bench", exist_ok=True)
    path = f"/tmp/kaobs-bench/metrics-{mix}-{packets}.pcap"
    if not os.path.exists(path):
        make_capture.generate(path, packets, seed=7, snaplen=128, mix=mix)
    return path


def live(records: list, metrics: WatchMetrics | None) -> tuple[float, int]:
    """Feed the records as run_live does; return CPU seconds and connections judged."""
    expectations = build_expectations(EXPECT)
    events: list[ModelEvent] = []
    analysis = Analysis((5432,), on_event=events.append, hz=250)
    gc.collect()
    started = time.process_time()
    last_tick = 0.0
    fed = 0
    for i in range(0, len(records), BATCH):
        batch = records[i:i + BATCH]
        analysis.feed(batch)
        fed += len(batch)
        if events:
            if metrics is not None:
                for event in events:
                    metrics.on_event(event)
            events.clear()
        now = batch[-1][1] if isinstance(batch[-1], tuple) else 0.0
        if metrics is not None and now - last_tick >= 0.25:
            last_tick = now
            metrics.on_tick(analysis.model.connections, LiveStats(fed, fed), now)
    analysis.finish()
    judged = 0
    for report in analysis.reports(expectations):
        judged += 1
        if metrics is not None:
            metrics.on_judged(report)
    return time.process_time() - started, judged


def scrape(metrics: WatchMetrics) -> tuple[int, int, float]:
    started = time.perf_counter()
    for _ in range(20):
        text = generate_latest(metrics.registry)
    seconds = (time.perf_counter() - started) / 20
    series = sum(1 for line in text.decode().splitlines() if line and not line.startswith("#"))
    return len(text), series, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=400_000)
    parser.add_argument("--mix", default="pgbench", choices=("pgbench", "short"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    path = capture(args.packets, args.mix)
    records = list(CaptureReader(path).records())
    print(f"capture: {path}, {len(records)} records")
    without, with_ = [], []
    judged = 0
    metrics = None
    for _ in range(args.repeat):
        seconds, judged = live(records, None)
        without.append(seconds)
        metrics = WatchMetrics(build_expectations(EXPECT), process=False)
        seconds, _ = live(records, metrics)
        with_.append(seconds)
    base, metered = min(without), min(with_)
    print(f"live pipeline, best of {args.repeat} (CPU s): without metrics {base:.3f}, with {metered:.3f} "
          f"(+{(metered / base - 1) * 100:.1f} %); {judged} connections judged, "
          f"{(metered - base) / max(judged, 1) * 1e6:.1f} us per connection")
    assert metrics is not None
    size, series, seconds = scrape(metrics)
    print(f"scrape of this capture: {size} bytes, {series} samples, generate_latest {seconds * 1000:.2f} ms")
    for servers in (1, 10, 100):
        many = WatchMetrics(build_expectations(EXPECT), process=False)
        from tests.test_metrics import mixed  # a conversation of every kind, moved to each server in turn
        from analysis.pipeline import analyze_segments

        for n in range(servers):
            for conv in mixed():
                conv.server.address = f"10.50.{n // 250}.{n % 250 + 1}"
                for segment in conv.segments:
                    if segment.sport == 5432:
                        segment.src = conv.server.address
                    else:
                        segment.dst = conv.server.address
                model, reports = analyze_segments(conv.segments, build_expectations(EXPECT))
                for report in reports:
                    many.on_judged(report)
        size, series, seconds = scrape(many)
        print(f"scrape with {servers:>3} server(s): {size:>8} bytes, {series:>6} samples, "
              f"generate_latest {seconds * 1000:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
