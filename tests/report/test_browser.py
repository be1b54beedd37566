"""The report in a real headless Chromium: every image loads (``naturalWidth > 0``) and the page
reports no error. Skipped where no Chromium is installed (Debian: ``apt-get install
chromium``; another binary: ``STEPH_CHROMIUM=/path/to/chrome``).

How: a copy of the page gets a checker script at the top of its ``<head>`` (the report itself
has no script). It records every error event (script errors, and resources that fail to load:
capture phase) and every ``console.error``, and after the ``load`` event (all images decoded)
writes ``{images, broken, errors}`` into the DOM, which ``chromium --dump-dom`` prints. The
browser's own console log (``--enable-logging=stderr``) must hold no message from the page
either. The second test shows the harness failing on a broken image and a script error."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest


def _chromium() -> str | None:
    given = os.environ.get("STEPH_CHROMIUM")
    if given:
        return given
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install "
                                                          "chromium, or set STEPH_CHROMIUM)")

CHECKER = """<script>
window.__stephErrors = [];
window.addEventListener("error", function (e) {
  var t = e.target;
  window.__stephErrors.push(e.message || ("failed to load " + (t && (t.src || t.href) || "?")).slice(0, 120));
}, true);
var __ce = console.error;
console.error = function () {
  window.__stephErrors.push("console.error: " + Array.prototype.join.call(arguments, " "));
  __ce.apply(console, arguments);
};
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                   .map(function (i) { return i.alt || i.src.slice(0, 60); });
  var out = document.createElement("pre");
  out.id = "steph-check";
  out.textContent = JSON.stringify({images: imgs.length, broken: broken,
                                    errors: window.__stephErrors});
  document.body.appendChild(out);
});
</script>"""


def render(page: Path, tmp: Path) -> tuple[dict, list[str]]:
    """Load ``page`` (with the checker) in headless Chromium: the checker's result and the
    console lines of the browser's log."""
    checked = tmp / f"checked-{page.name}"
    text = page.read_text()
    checked.write_text(re.sub(r"<head>", "<head>\n" + CHECKER, text, count=1))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-extensions", f"--user-data-dir={tmp / 'chromium-profile'}",
           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom",
           checked.resolve().as_uri()]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180)
    m = re.search(r'<pre id="steph-check">(.*?)</pre>', proc.stdout, re.DOTALL)
    assert m, f"Chromium printed no check result (exit {proc.returncode}): {proc.stderr[-2000:]}"
    import html

    result = json.loads(html.unescape(m.group(1)))
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return result, console


def test_report_renders_without_errors(built_report, tmp_path):
    page = built_report.path
    n_images = len(re.findall(r"<img ", page.read_text()))
    result, console = render(page, tmp_path)
    assert result["images"] == n_images >= 10
    assert result["broken"] == []
    assert result["errors"] == []
    assert console == []


def test_the_harness_sees_broken_images_and_errors(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>'
                    '<img alt="broken" src="data:image/png;base64,AAAA">'
                    "<script>undefinedFunction();</script></body></html>")
    result, console = render(page, tmp_path)
    assert result["images"] == 1 and result["broken"] == ["broken"]
    assert any("undefinedFunction" in e for e in result["errors"])
    assert any("failed to load" in e for e in result["errors"])
    assert any("undefinedFunction" in line for line in console)
