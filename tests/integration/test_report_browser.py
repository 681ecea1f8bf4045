"""Render the HTML report in headless Chromium and check that every figure was drawn, error-free.

Uses the ``chromium`` binary directly (Debian package ``chromium``; no selenium/playwright):
``--dump-dom`` gives the DOM after plotly.js ran (``--virtual-time-budget`` lets the page settle)
and ``--enable-logging=stderr`` puts the page's console messages on stderr as
``...:INFO:CONSOLE:<line>] "<message>", source: <url> (<line>)``.

Chromium logs every console message at INFO level, whatever its level, so ``console.error`` cannot
be told apart from ``console.log`` in that log. The page is therefore rendered from a copy with a
small probe script prepended to ``<head>`` that (1) re-emits ``console.error`` messages with an
``[console.error]`` prefix and (2) records uncaught errors, unhandled promise rejections, failed
resource loads and ``console.error`` calls in a ``data-probe-errors`` attribute on ``<html>``, which
``--dump-dom`` then shows. Errors are reported from both channels; the detection itself is tested
on deliberately broken pages.

If Chromium is missing the tests skip, except under CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import viz
from test_viz import XSS_ID, make_result  # tests/unit/viz is on sys.path (tests/conftest.py)

pytestmark = pytest.mark.browser

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

_PROBE = """<script>
(function () {
  var errs = [];
  function record(kind, msg) {
    errs.push(kind + ": " + String(msg));
    document.documentElement.setAttribute("data-probe-errors", JSON.stringify(errs));
  }
  var origError = console.error.bind(console);
  console.error = function () {
    var msg = Array.prototype.map.call(arguments, String).join(" ");
    record("console.error", msg);
    origError("[console.error] " + msg);
  };
  window.addEventListener("error", function (e) {
    if (e.target && e.target !== window && (e.target.src || e.target.href)) {
      record("resource", e.target.src || e.target.href);
    } else {
      record("uncaught", e.message);
    }
  }, true);
  window.addEventListener("unhandledrejection", function (e) { record("unhandledrejection", e.reason); });
})();
</script>
"""

_CONSOLE_ERROR = re.compile(r"error|uncaught", re.IGNORECASE)
# e.g. [123:123:1129/115034.353867:INFO:CONSOLE:1] "Uncaught Error: boom", source: file:///x.html (1)
# (older Chromium: ...:INFO:CONSOLE(1)] ...). Only the message is searched, not the source URL.
_CONSOLE_LINE = re.compile(r'CONSOLE[^\]]*\]\s*"(?P<msg>.*)",\s*source:', re.DOTALL)


def console_errors(stderr: str) -> list[str]:
    """Chromium stderr lines of console messages whose text mentions an error or "Uncaught"."""
    out = []
    for line in stderr.splitlines():
        if "CONSOLE" not in line:
            continue
        m = _CONSOLE_LINE.search(line)
        msg = m.group("msg") if m else line.split("CONSOLE", 1)[1].split(", source:", 1)[0]
        if _CONSOLE_ERROR.search(msg):
            out.append(line)
    return out


def _find_chromium() -> str:
    """Path of the Chromium binary; skips (or fails under CI) when there is none."""
    override = os.environ.get("CHROMIUM")
    candidates = [override] if override else []
    candidates += [shutil.which(c) for c in CHROMIUM_CANDIDATES]
    candidates.append("/usr/bin/chromium")
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    msg = ("headless Chromium not found (looked for $CHROMIUM, " + ", ".join(CHROMIUM_CANDIDATES)
           + ", /usr/bin/chromium); install it with `apt-get install -y chromium`")
    if os.environ.get("CI"):
        pytest.fail("CI is set but " + msg)
    pytest.skip(msg)


def render(page: Path, workdir: Path, budget_ms: int = 10000) -> tuple[str, list[str]]:
    """Load ``page`` in headless Chromium; return (DOM after rendering, list of detected errors).

    The page is rendered from an instrumented copy in ``workdir`` (see the module docstring); the
    original file is not modified.
    """
    chromium = _find_chromium()
    text = page.read_text(encoding="utf-8")
    head = re.search(r"<head[^>]*>", text, re.IGNORECASE)
    instrumented = text[: head.end()] + _PROBE + text[head.end():] if head else _PROBE + text
    copy = workdir / ("instrumented-" + page.name)
    copy.write_text(instrumented, encoding="utf-8")
    profile = workdir / "chromium-profile"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-extensions", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
           "--enable-logging=stderr", "--v=0", f"--virtual-time-budget={budget_ms}",
           "--window-size=1200,900", "--dump-dom", copy.resolve().as_uri()]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, errors="replace")
    except subprocess.TimeoutExpired as e:  # pragma: no cover - environment problem
        pytest.fail(f"chromium did not finish in {e.timeout}s")
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
    dom = proc.stdout
    assert "<html" in dom, f"chromium dumped no DOM; stderr:\n{proc.stderr[-3000:]}"
    errors = console_errors(proc.stderr)
    root = re.search(r"<html[^>]*>", dom)
    m = re.search(r'data-probe-errors="([^"]*)"', root.group(0)) if root else None
    if m:
        errors += json.loads(html.unescape(m.group(1)))
    return dom, errors


def _figure_segments(dom: str) -> list[tuple[str, str]]:
    """(div start tag, DOM text up to the next figure) for every ``<div id="figure-N">``."""
    starts = list(re.finditer(r'<div[^>]*\bid="figure-\d+"[^>]*>', dom))
    ends = [m.start() for m in starts[1:]] + [len(dom)]
    return [(m.group(0), dom[m.start():end]) for m, end in zip(starts, ends)]


def _check_rendered(dom: str, n_figures: int) -> None:
    segments = _figure_segments(dom)
    assert len(segments) == n_figures
    assert dom.count('class="plotly-graph-div js-plotly-plot"') == n_figures  # plotly initialised each div
    for tag, seg in segments:
        assert "js-plotly-plot" in tag, f"{tag}: plotly did not initialise this figure"
        svgs = re.findall(r'<svg class="main-svg"[^>]*>(.*?)</svg>', seg, re.DOTALL)
        assert svgs and len(svgs[0]) > 1000, f"{tag}: empty or missing main svg"
        assert re.search(r'class="(trace\b[^"]*|hm|bars)"', seg), f"{tag}: no trace was drawn"
        assert re.search(r'<path[^>]*\bd="M[^"]+"', seg), f"{tag}: no drawn path"
        title = re.search(r'class="gtitle"[^>]*>(.*?)</text>', seg, re.DOTALL)
        assert title and title.group(1).strip(), f"{tag}: no figure title"


def test_console_line_parsing():
    stderr = "\n".join([
        '[1:1:1129/1.1:ERROR:dbus/bus.cc:405] Failed to connect to the bus',
        '[1:1:1129/1.2:INFO:CONSOLE:1] "all fine", source: file:///tmp/test_error_dir/a.html (1)',
        '[1:1:1129/1.3:INFO:CONSOLE:1] "Uncaught Error: boom", source: file:///tmp/a.html (1)',
        '[1:1:1129/1.4:INFO:CONSOLE(7)] "[console.error] bad", source: file:///tmp/a.html (7)',
    ])
    assert [line[-40:] for line in console_errors(stderr)] == [
        line[-40:] for line in stderr.splitlines()[2:]]


def test_error_detection_catches_broken_pages(tmp_path):
    """The detection must see an uncaught exception, a console.error and a failed resource load."""
    _find_chromium()
    cases = {
        "throw.html": ('<script>throw new Error("boom")</script>', "boom"),
        "console.html": ('<script>console.error("bad thing")</script>', "bad thing"),
        "missing.html": ('<script src="does-not-exist.js"></script>', "does-not-exist.js"),
    }
    for name, (body, needle) in cases.items():
        page = tmp_path / name
        page.write_text(f"<!DOCTYPE html><html><head><title>t</title></head><body><p>x</p>{body}</body></html>")
        _, errors = render(page, tmp_path, budget_ms=1000)
        assert any(needle in e for e in errors), f"{name}: error not detected, got {errors}"
    # the uncaught exception is also visible on the plain stderr channel
    _, errors = render(tmp_path / "throw.html", tmp_path, budget_ms=1000)
    assert any("CONSOLE" in e and "Uncaught Error: boom" in e for e in errors)
    clean = tmp_path / "clean.html"
    clean.write_text('<!DOCTYPE html><html><head></head><body><script>console.log("all fine")</script></body></html>')
    assert render(clean, tmp_path, budget_ms=1000)[1] == []


def test_report_renders_every_figure_without_errors(tmp_path):
    ids = [f"fact-{i:02d}" for i in range(6)]
    ids[2] = XSS_ID
    res = make_result(fact_ids=ids)
    n_figures = len(viz.all_figures(res))
    assert n_figures == 6
    page = viz.write_report(res, tmp_path / "report.html")
    dom, errors = render(page, tmp_path)
    assert errors == [], "console errors while rendering the report:\n" + "\n".join(errors)
    _check_rendered(dom, n_figures)
    assert dom.count('class="main-svg"') >= n_figures
    # the hostile fact id was rendered as text, not executed
    assert "data-xss" not in re.search(r"<html[^>]*>", dom).group(0)
    assert "max-entropy" in dom and "synthetic/llm-8L" in dom


def test_attack_only_report_renders(tmp_path):
    res = make_result(post=False)
    page = viz.write_report(res, tmp_path / "attack_only.html")
    dom, errors = render(page, tmp_path)
    assert errors == [], "\n".join(errors)
    _check_rendered(dom, 4)
