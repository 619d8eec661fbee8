"""The pictures, opened for real: every capture's --html page and its --format mermaid in headless Chromium.

Each page must render offline (no request leaves file://), without a
script error in the console, with a lane figure per connection whose
probes are the JSON report's (as many, as many answered) and visibly drawn
(the probe colour is on the screenshot). Each capture's Mermaid diagram is
parsed and drawn by mermaid.js itself (the copy the `mermaidx` package
ships), in the same browser, and must show the participants, the probes
and the abort.

Chromium is Debian's (scripts/setup.sh installs it), driven by Playwright
without a browser download. Without it these tests skip and say why,
except in CI (CI=true, or KAOBS_REQUIRE_PRIVILEGED=1 as .ci/run sets),
where a missing browser fails them.

``KAOBS_SCREENSHOTS=docs/img python3 -m pytest tests/test_html_report.py -k "seed or middlebox_drop_idle8_client"``
writes the README's pictures (docs/img/timeline-seed.png, timeline-middlebox-drop.png).
"""
from __future__ import annotations

import importlib.resources
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from kaobs.cli import run

ROOT = Path(__file__).resolve().parents[1]
ENTRIES = json.loads((ROOT / "captures" / "manifest.json").read_text())["captures"]
REQUIRED = os.environ.get("CI") == "true" or os.environ.get("KAOBS_REQUIRE_PRIVILEGED") == "1"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SERVER_BLUE = (0x1F, 0x5F, 0xA8)
CLIENT_GREEN = (0x2B, 0x8A, 0x3E)


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]', as scripts/setup.sh does)"
    if shutil.which("chromium") is None:
        return "chromium is not installed (bash scripts/setup.sh installs Debian's chromium)"
    return None


@pytest.fixture(scope="module")
def browser():
    reason = _missing()
    if reason is not None:
        if REQUIRED:
            pytest.fail(f"CI must open the pages in a browser, but {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=shutil.which("chromium"), headless=True, args=ARGS)
        yield chromium
        chromium.close()


def kaobs(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = run(list(args))
    return code, capsys.readouterr().out


class Page:
    """A page opened in Chromium, with what it logged and asked for."""

    def __init__(self, browser, path: Path, width: int = 1280) -> None:
        self.page = browser.new_page(viewport={"width": width, "height": 900})
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(path.as_uri(), wait_until="load")

    def close(self) -> None:
        self.page.close()


DRAWN_JS = """(name) => window.Bokeh !== undefined
  && Bokeh.documents.some(d => d.is_idle && d.roots().some(r => r.name === name))"""


def open_timeline(browser, path: Path) -> Page:
    """The page, with every figure drawn: each one is drawn as it comes into view, so scroll to each."""
    page = Page(browser, path)
    targets = page.page.evaluate(
        "() => Array.from(document.querySelectorAll('script.bokeh-item')).map(s => s.dataset.target)")
    for target in targets:
        page.page.locator(f"#{target}").scroll_into_view_if_needed()
        page.page.wait_for_function(DRAWN_JS, arg=target, timeout=30_000)
    assert page.page.evaluate("() => Bokeh.documents.length") == len(targets)
    return page


LANES_JS = """() => Object.fromEntries(Bokeh.documents.flatMap(d => d.roots()).filter(r => r.name.startsWith('lane-'))
  .map(r => {
    const points = r.renderers.find(x => x.name === 'points').data_source.data;
    const get = (k) => Array.from(points.get ? points.get(k) : points[k]);
    return [r.name, {kinds: get('kind'), fills: get('fill'),
                     lanes: Object.values(Object.fromEntries(r.left[0].major_label_overrides))}];
  }))"""


def colour_pixels(png: bytes, colour: tuple[int, int, int], slack: int = 12) -> int:
    import numpy
    from PIL import Image

    pixels = numpy.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=numpy.int16)
    return int((numpy.abs(pixels - numpy.array(colour, dtype=numpy.int16)) <= slack).all(axis=-1).sum())


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["file"] for e in ENTRIES])
def test_the_page_of_every_capture_renders_its_lanes_and_probes_offline(entry, browser, tmp_path, capsys):
    page_path = tmp_path / "timeline.html"
    code, out = kaobs(capsys, "analyze", str(ROOT / "captures" / entry["file"]), *entry["expect_args"],
                      "--format", "json", "--html", str(page_path), "--quiet")
    assert code == entry["exit_code"]
    document = json.loads(out)
    page = open_timeline(browser, page_path)
    try:
        assert page.errors == []
        assert [url for url in page.requests if not url.startswith(("file:", "data:"))] == []  # opens offline
        lanes = page.page.evaluate(LANES_JS)
        assert sorted(lanes) == sorted(f"lane-{c['id']}" for c in document["connections"])  # every one drawn
        for connection in document["connections"]:
            lane = lanes[f"lane-{connection['id']}"]
            sides = connection["sides"]
            assert lane["lanes"] == [f"server kernel {connection['server']}", "the path",
                                     f"client kernel {connection['client']}"]
            probes = [i for i, kind in enumerate(lane["kinds"]) if kind == "probe"]
            assert len(probes) == sides["server"]["keepalive_probes"] + sides["client"]["keepalive_probes"]
            filled = sum(1 for i in probes if lane["fills"][i] != "white")  # filled: answered, hollow: not
            assert filled == sides["server"]["answered_probes"] + sides["client"]["answered_probes"]
            aborts = sum(1 for side in sides.values() if side["abort"] is not None)
            assert lane["kinds"].count("abort") == aborts
            if connection["path_cut"] is not None:
                assert "cut" in lane["kinds"]
            png = page.page.locator(f"#c{connection['id']} .lane").screenshot()
            for role, colour in (("server", SERVER_BLUE), ("client", CLIENT_GREEN)):
                if sides[role]["keepalive_probes"]:
                    assert colour_pixels(png, colour) > 40, f"#{connection['id']}: no {role} probe on the picture"
        if entry["file"].startswith("seed_"):
            _keep_screenshot(page, "timeline-seed.png", "#c1")
        if entry["file"] == "middlebox_drop_idle8_client_side.pcap":
            _keep_screenshot(page, "timeline-middlebox-drop.png", "#c3")  # two hours drawn short
    finally:
        page.close()


def _keep_screenshot(page: Page, name: str, section: str) -> None:
    """The README's pictures: a connection as drawn, when KAOBS_SCREENSHOTS names a directory."""
    folder = os.environ.get("KAOBS_SCREENSHOTS")
    if not folder:
        return
    from PIL import Image

    page.page.set_viewport_size({"width": 1280, "height": 900})
    page.page.wait_for_function("() => Bokeh.documents.every(d => d.is_idle)")
    page.page.wait_for_timeout(300)
    png = page.page.locator(section).screenshot()
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=64)
    image.save(Path(folder) / name, optimize=True)


def test_the_overview_comes_first_with_the_troubled_on_top_and_the_histogram(browser, tmp_path, capsys):
    page_path = tmp_path / "timeline.html"
    capture = ROOT / "captures" / "middlebox_drop_idle8_client_side.pcap"
    kaobs(capsys, "analyze", str(capture), "--client-dsn", "tcp_user_timeout=5000", "--html", str(page_path), "-q")
    page = open_timeline(browser, page_path)
    try:
        assert page.errors == []
        order = page.page.evaluate("() => Array.from(document.querySelectorAll('section')).map(s => s.id)")
        assert order == ["overview", "c2", "c3", "c1"]  # the path's cuts first, then the others
        overview = page.page.locator("#overview").inner_text()
        assert "3 connection(s)" in overview and "Problems, worst first (2)" in overview
        assert "the path forgets connections idle between 4.8 s and 10.0 s" in overview
        roots = page.page.evaluate("() => Bokeh.documents.flatMap(d => d.roots()).map(r => r.name)")
        assert roots[0] == "idle-before-death"
        histogram = page.page.evaluate("""() => {
            const figure = Bokeh.documents.flatMap(d => d.roots()).find(r => r.name === 'idle-before-death');
            const column = (data, key) => Array.from(data.get ? data.get(key) : data[key]);
            return figure.renderers.map(r => column(r.data_source.data, 'text'));
        }""")
        assert histogram == [["2 path drop after 8.3 s-10.0 s idle"]]
        assert page.page.locator("#c2 aside").inner_text().count("[") >= 4  # the settings' sources as notes
    finally:
        page.close()


def test_a_page_of_many_lanes_draws_them_as_they_come_into_view(browser, tmp_path):
    from kaobs.htmlreport import HtmlReport
    from tests.test_text_report import many_connections

    run_info, reports, expectations = many_connections(quiet=0, mismatched=10, aborted=0, healthy=0)
    path = tmp_path / "many.html"
    page_writer = HtmlReport(str(path))
    for report in reports:
        page_writer.add(report)
    assert page_writer.finish(run_info, expectations) == 10
    page = Page(browser, path)
    try:
        page.page.wait_for_function("() => window.Bokeh !== undefined && Bokeh.documents.length > 0"
                                    " && Bokeh.documents.every(d => d.is_idle)")
        assert 0 < page.page.evaluate("() => Bokeh.documents.length") < 10  # the first screen only
        page.page.locator("#lane-10").scroll_into_view_if_needed()
        page.page.wait_for_function(DRAWN_JS, arg="lane-10")
        assert page.errors == []
    finally:
        page.close()


# -- mermaid -------------------------------------------------------------------------------------------

RENDER_JS = """async (source) => {
  try {
    await mermaid.parse(source);
    const {svg} = await mermaid.render('m' + Math.random().toString(36).slice(2), source);
    const out = document.getElementById('out');
    out.innerHTML = svg;
    return {ok: true, text: out.querySelector('svg').textContent};
  } catch (e) { return {ok: false, error: String(e && e.message || e)}; }
}"""


@pytest.fixture(scope="module")
def mermaid_page(browser, tmp_path_factory):
    """A page with mermaid.js (the copy mermaidx ships: mermaid 11, what GitHub runs)."""
    script = importlib.resources.files("mermaidx") / "assets" / "mermaid.js"
    assert script.is_file(), "mermaidx no longer ships assets/mermaid.js: load mermaid.js from elsewhere"
    harness = tmp_path_factory.mktemp("mermaid") / "harness.html"
    harness.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><script src='{Path(str(script)).as_uri()}'>"
                       "</script></head><body><div id='out'></div><script>mermaid.initialize({startOnLoad: false, "
                       "securityLevel: 'strict'});</script></body></html>")
    page = Page(browser, harness)
    page.page.wait_for_function("() => window.mermaid !== undefined")
    yield page
    page.close()


def test_a_broken_diagram_is_caught(mermaid_page):
    result = mermaid_page.page.evaluate(RENDER_JS, "sequenceDiagram\n    S->>C: probe; unanswered\n")
    assert result["ok"] is False and "Parse error" in result["error"]


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["file"] for e in ENTRIES])
def test_the_mermaid_of_every_capture_is_parsed_and_drawn_by_mermaid(entry, mermaid_page, capsys):
    capture = str(ROOT / "captures" / entry["file"])
    _, diagram = kaobs(capsys, "analyze", capture, *entry["expect_args"], "--format", "mermaid")
    _, out = kaobs(capsys, "analyze", capture, *entry["expect_args"], "--format", "json")
    number = int(re.search(r"%% kaobs: connection #(\d+) ", diagram).group(1))
    connection = next(c for c in json.loads(out)["connections"] if c["id"] == number)
    result = mermaid_page.page.evaluate(RENDER_JS, diagram)
    assert result.get("ok"), (result.get("error"), diagram)
    text = result["text"]
    assert f"client {connection['client']}" in text and f"server {connection['server']}" in text
    for role, side in connection["sides"].items():
        keepalive = [p for p in side["probes"] if p["kind"] == "keepalive"]  # numbered as the text report does
        unanswered = [n for n, p in enumerate(keepalive, 1) if not p["answered"]]
        for n in unanswered:
            assert f"probe {n}" in text, (role, n, diagram)
        if side["abort"] is not None:
            assert "ABORT (RST)" in text
    assert mermaid_page.errors == []
