#!/usr/bin/env python3
"""How big the --html page is, how long kaobs takes to write it and a browser to draw it.

Three pages: the seed capture's; a capture of about 100 connections from
`make_capture.py` (`--packets`, default 30,000), once as kaobs writes it
(at most 20 lanes per kind of trouble and 20 others) and once with every
connection drawn; and, with `--big-packets`, the page of a large capture
(what kaobs writes for a million packets, and its peak memory). Each page
is written by `kaobs analyze FILE --html PAGE` in a subprocess (the
"all drawn" one in this process, with the lane limits lifted), and opened
in headless Chromium (Debian's, through Playwright) when it is installed:
the time from navigation until every figure is drawn.

Usage:
    python3 bench/bench_html.py
    python3 bench/bench_html.py --packets 30000 --big-packets 1000000
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from make_capture import generate  # noqa: E402

SEED = ROOT / "captures" / "seed_idle3_int2_cnt3_dead_client.pcap"
SEED_ARGS = ["--expect", "tcp_keepalives_idle=3", "--expect", "tcp_keepalives_interval=2",
             "--expect", "tcp_keepalives_count=3"]
SNAPLEN = 96
BENCH_ARGS = ["--expect", "tcp_keepalives_idle=5"]  # contradicted on some connections: troubled ones to draw


def kaobs_page(capture: Path, page: Path, args: list[str]) -> tuple[float, float, int]:
    """(seconds, peak MB, connections) of `kaobs analyze CAPTURE --html PAGE`."""
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "kaobs", "analyze", str(capture), *args, "--html", str(page),
                                "--summary", "-q"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    out = process.stdout.read()
    _, _, usage = os.wait4(process.pid, 0)
    seconds = time.monotonic() - started
    peak = usage.ru_maxrss / 1024
    connections = int(out.strip().splitlines()[-1].split(" connection(s)")[0])
    return seconds, peak, connections


def every_lane_page(capture: Path, page: Path, args: list[str]) -> float:
    """The page with every connection drawn (no lane limit), written in this process; returns seconds."""
    from analysis.expect import build_expectations
    from analysis.pipeline import Analysis, AnalysisRun
    from kaobs.htmlreport import HtmlReport
    from sniffer.pcapfile import CaptureReader

    expect = [value for flag, value in zip(args[::2], args[1::2]) if flag == "--expect"]
    expectations = build_expectations(expect)
    analysis = Analysis([5432])
    analysis.feed(CaptureReader(str(capture)).records())
    analysis.finish()
    started = time.monotonic()
    html = HtmlReport(str(page), title="every connection", lanes_per_kind=10**9, other_lanes=10**9)
    for report in analysis.reports(expectations):
        html.add(report)
    html.finish(AnalysisRun(sources=[str(capture)]), expectations)
    return time.monotonic() - started


FRAMES_JS = "() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))"
FIRST_JS = "() => window.Bokeh !== undefined && Bokeh.documents.every(d => d.is_idle)"
DRAWN_JS = """(name) => Bokeh.documents.some(d => d.is_idle && d.roots().some(r => r.name === name))"""


def draw_seconds(pages: list[Path]) -> list[tuple[float, float] | None]:
    """(first screen, every figure) seconds from navigation, in headless Chromium (figures are drawn as they come
    into view: the second scrolls to each)."""
    chromium = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return [None] * len(pages)
    if chromium is None:
        return [None] * len(pages)
    out: list[tuple[float, float] | None] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        for path in pages:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            started = time.monotonic()
            page.goto(path.as_uri(), wait_until="load")
            page.evaluate(FRAMES_JS)  # the figures in view have been asked for
            page.wait_for_function(FIRST_JS, timeout=300_000)
            first = time.monotonic() - started
            targets = page.evaluate(
                "() => Array.from(document.querySelectorAll('script.bokeh-item')).map(s => s.dataset.target)")
            for target in targets:
                page.locator(f"#{target}").scroll_into_view_if_needed()
                page.wait_for_function(DRAWN_JS, arg=target, timeout=300_000)
            out.append((first, time.monotonic() - started))
            page.close()
        browser.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packets", type=int, default=30_000, help="packets of the ~100-connection capture")
    parser.add_argument("--big-packets", type=int, default=0, help="also a large capture (e.g. 1000000)")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kaobs-bench-html-") as tmp:
        folder = Path(tmp)
        rows: list[tuple[str, int, float, float | None, Path]] = []
        seconds, peak, connections = kaobs_page(SEED, folder / "seed.html", SEED_ARGS)
        rows.append(("seed capture", connections, seconds, peak, folder / "seed.html"))
        capture = folder / "bench.pcap"
        generate(str(capture), options.packets, seed=1, snaplen=SNAPLEN)
        seconds, peak, connections = kaobs_page(capture, folder / "bench.html", BENCH_ARGS)
        rows.append((f"make_capture {options.packets} packets", connections, seconds, peak, folder / "bench.html"))
        seconds = every_lane_page(capture, folder / "every.html", BENCH_ARGS)
        rows.append(("the same, every connection drawn", connections, seconds, None, folder / "every.html"))
        if options.big_packets:
            big = folder / "big.pcap"
            generate(str(big), options.big_packets, seed=1, snaplen=SNAPLEN)
            seconds, peak, connections = kaobs_page(big, folder / "big.html", BENCH_ARGS)
            rows.append((f"make_capture {options.big_packets} packets", connections, seconds, peak, folder / "big.html"))
        draws = draw_seconds([row[4] for row in rows])
        print("| page | connections | lanes drawn | HTML | kaobs analyze --html | peak RSS | Chromium: first screen "
              "| Chromium: every figure |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for (name, connections, seconds, peak, path), draw in zip(rows, draws):
            lanes = path.read_text(encoding="utf-8").count('<section class="conn"')
            first, every = ("-", "-") if draw is None else (f"{draw[0]:.1f} s", f"{draw[1]:.1f} s")
            print(f"| {name} | {connections} | {lanes} | {path.stat().st_size / 1e6:.2f} MB | {seconds:.1f} s | "
                  f"{'-' if peak is None else f'{peak:.0f} MB'} | {first} | {every} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
