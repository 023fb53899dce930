"""The HTML report in a real browser (Debian's chromium, headless): it loads with no console errors and
fetches nothing, its charts render, its tables sort on click, and a screenshot at a fixed size shows
the charts. Skips where chromium is not installed (`.ci/run` installs it where it can)."""
import html
import json
import re
import shutil
import struct
import subprocess
import zlib

import pytest

from tensordiff.run import trace_job
from tests.conftest import make_job

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (apt-get install chromium)")

PROBE = """<script>
(function(){
 var out = {errors: [], charts: 0, drawn: 0, sorted_up: null, sorted_down: null, header: null};
 window.addEventListener('error', function(e){ out.errors.push(String(e.message)); });
 window.addEventListener('load', function(){
  var svgs = document.querySelectorAll('svg');
  out.charts = svgs.length;
  document.querySelectorAll('svg polyline').forEach(function(p){ var b = p.getBBox(); if (b.width > 50) out.drawn++; });
  var h = Array.from(document.querySelectorAll('h2')).find(function(x){ return x.textContent == 'Cost side by side'; });
  var table = h; while (table && table.tagName != 'TABLE') table = table.nextElementSibling;
  var th = table.tHead.rows[0].cells[2];
  out.header = th.textContent;
  function column(){ return Array.from(table.tBodies[0].rows).map(function(r){ return parseFloat(r.cells[2].textContent); }); }
  function ordered(v, up){ for (var i = 1; i < v.length; i++) if (up ? v[i] < v[i-1] : v[i] > v[i-1]) return false; return v.length > 2; }
  th.click(); out.sorted_up = ordered(column(), true);
  th.click(); out.sorted_down = ordered(column(), false);
  var pre = document.createElement('pre'); pre.id = 'td-probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
 });
})();
</script>"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A real diverged run with error maps and the cost table: flash_attn's 256-entry buffer at 320 tokens."""
    tmp = tmp_path_factory.mktemp("browser")
    result = trace_job(make_job(tmp, name="run", seq_len=320, target="flash_attn", fault="seq-cap-256",
                                isolate=False, timing=True, time_plain=True)).result
    assert result.verdict == "diverged" and result.culprit.get("error_map")
    return tmp / "run" / "report.html"


def _chromium(tmp_path, *args):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
           "--host-resolver-rules=MAP * ~NOTFOUND",  # a fetch could not succeed, and would log an error
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=3000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_report_loads_clean_fetches_nothing_and_sorts(report, tmp_path):
    text = report.read_text()
    # nothing external: no scripts, styles, images or fonts from elsewhere (SVG's xmlns is a name, not a fetch)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(\s*["']?https?:""", text)
    page = tmp_path / "probe.html"
    page.write_text(text.replace("</body>", PROBE + "</body>"))
    run = _chromium(tmp_path, "--dump-dom", page.as_uri())
    assert run.returncode == 0, run.stderr[-2000:]
    console = [l for l in run.stderr.splitlines() if ":CONSOLE" in l or "net::ERR" in l]
    assert not console, console
    found = re.search(r'<pre id="td-probe">(.*?)</pre>', run.stdout, re.S)
    assert found, run.stdout[-2000:]
    probe = json.loads(html.unescape(found.group(1)))
    assert probe["errors"] == []
    # the run chart and one chart per axis of the culprit's and the first divergence's records
    assert probe["charts"] >= 4 and probe["drawn"] >= 4, probe
    assert probe["header"] == "target self s"
    assert probe["sorted_up"] and probe["sorted_down"], probe


def _png_pixels(data: bytes):
    """(width, height, rows of RGB tuples) of a non-interlaced 8-bit RGB / RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks, width = 8, [], 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            chunks.append(body)
        pos += 12 + n
    raw = zlib.decompress(b"".join(chunks))
    stride = width * channels
    rows, prev = [], bytearray(stride)
    for r in range(height):
        f, line = raw[r * (stride + 1)], bytearray(raw[r * (stride + 1) + 1:(r + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b, c = prev[i], prev[i - channels] if i >= channels else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append([tuple(line[i:i + 3]) for i in range(0, stride, channels)])
        prev = line
    return width, height, rows


def test_screenshot_at_a_fixed_size_shows_the_charts(report, tmp_path):
    shot = tmp_path / "shot.png"
    run = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1000,700", "--hide-scrollbars", report.as_uri())
    assert shot.exists(), run.stderr[-2000:]
    width, height, rows = _png_pixels(shot.read_bytes())
    assert (width, height) == (1000, 700)
    pixels = [p for row in rows for p in row]
    ink = sum(1 for p in pixels if sum(p) < 600) / len(pixels)
    assert 0.01 < ink < 0.5, ink                        # text and charts, not a blank or a black page
    blue = sum(1 for r, g, b in pixels if abs(r - 0x34) < 40 and abs(g - 0x65) < 40 and abs(b - 0xa4) < 40)
    assert blue > 200, blue                             # the error curve (#3465a4) is drawn
