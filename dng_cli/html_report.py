"""``report.html``: one self-contained page for a folder of runs (``dng report <dir>`` writes it beside report.md).

No server and no network: images are embedded as data URIs, the table sorts with a few lines of inline script,
so the page works from a cluster's shared folder or an e-mail attachment. It shows the runs table (the numbers of
report.csv, each cell carrying its column's name), the safety–quality fronts (the Pareto plots with their
intervals), the matched-safety tables when the folder holds a ``dng compare`` (compare.md), every run's sample
grid, and the failed or unfinished jobs.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

# (report.csv column, header, digits) of the runs table; model/dataset/fingerprint/run are text
NUMBER_COLUMNS = (("guidance_scale", "scale", 4), ("n_samples", "N", 6), ("forbidden_rate", "forbidden rate", 4),
                  ("forbidden_rate_lo", "95 % CI low", 4), ("forbidden_rate_hi", "95 % CI high", 4),
                  ("kl_kept", "KL kept", 4), ("kl_kept_se", "± s.e.", 2), ("kl_uniform", "KL", 4),
                  ("kl_uniform_se", "± s.e.", 2), ("fid", "FID", 4), ("fid_se", "± s.e.", 2),
                  ("fid_inception", "Inception FID", 4), ("kid_inception", "Inception KID", 3),
                  ("images_per_s", "images/s", 3))
MAX_GRIDS = 200  # sample grids embedded (the first runs of the table); the rest are named

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:1400px;padding:0 1em;color:#222}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;margin:.6em 0}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:right} td.text,th.text{text-align:left}
th[data-sortable]{cursor:pointer;background:#f3f3f3} th[data-sortable]:hover{background:#e4e4e4}
th.asc::after{content:" ▲"} th.desc::after{content:" ▼"} code{font-size:.92em}
.fronts img{max-width:48%;margin-right:1%} figure{display:inline-block;margin:.4em;vertical-align:top}
figure img{width:220px;image-rendering:pixelated;border:1px solid #ccc} figcaption{font-size:.85em;max-width:220px}
.failed li{color:#a00} .wide{overflow-x:auto}
"""

SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th[data-sortable]').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var asc = !th.classList.contains('asc');
      table.querySelectorAll('th').forEach(function (h) { h.classList.remove('asc', 'desc'); });
      th.classList.add(asc ? 'asc' : 'desc');
      var index = Array.prototype.indexOf.call(th.parentNode.children, th);
      function key(row) {
        var cell = row.children[index], v = cell.getAttribute('data-value');
        if (v === null || v === '') return {empty: true};
        var x = parseFloat(v);
        return isNaN(x) ? {text: v} : {num: x};
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x.empty || y.empty) return (x.empty ? 1 : 0) - (y.empty ? 1 : 0);
        var d = ('num' in x && 'num' in y) ? x.num - y.num : String(x.text || x.num).localeCompare(String(y.text || y.num));
        return asc ? d : -d;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def data_uri(path: Path) -> str | None:
    """A PNG file as a data URI (None when it is missing or not a PNG)."""
    try:
        raw = Path(path).read_bytes()
    except OSError:
        return None
    if not raw.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    return "data:image/png;base64," + base64.b64encode(raw).decode("ascii")


def fmt(value, digits: int) -> str:
    """A number as the table shows it (the same rounding the markdown report uses); "" for none."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _cell(value, digits: int | None = None, text: bool = False, col: str | None = None) -> str:
    shown = html.escape(fmt(value, digits) if digits else ("" if value is None else str(value)))
    raw = "" if value is None else html.escape(repr(value) if isinstance(value, float) else str(value), quote=True)
    attrs = f' data-value="{raw}"' + (f' data-col="{col}"' if col else "") + (' class="text"' if text else "")
    return f"<td{attrs}>{shown}</td>"


def runs_table(rows: list[dict]) -> str:
    numbers = [c for c in NUMBER_COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    head = ['<th class="text" data-sortable>run</th>', '<th class="text" data-sortable>method</th>',
            '<th class="text" data-sortable>model</th>', '<th class="text" data-sortable>dataset</th>',
            '<th class="text" data-sortable>forbidden</th>']
    head += [f"<th data-sortable>{html.escape(h)}</th>" for _, h, _ in numbers]
    head += ['<th class="text" data-sortable>fingerprint</th>']
    body = []
    for r in rows:
        cells = [_cell(r["run"], text=True, col="run"), _cell(r["label"], text=True, col="label"),
                 _cell(r.get("model"), text=True), _cell(r.get("dataset"), text=True),
                 _cell(" ".join(str(c) for c in r.get("forbidden") or []), text=True)]
        cells += [_cell(r.get(k), d, col=k) for k, _, d in numbers]
        cells += [_cell(r.get("fingerprint"), text=True)]
        body.append(f'<tr data-run="{html.escape(r["run"], quote=True)}">' + "".join(cells) + "</tr>")
    return ('<div class="wide"><table class="sortable" id="runs"><thead><tr>' + "".join(head) + "</tr></thead><tbody>\n"
            + "\n".join(body) + "\n</tbody></table></div>")


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def markdown_html(md: str) -> str:
    """The subset of markdown compare.md uses — paragraphs with **bold** and `code`, and pipe tables — as HTML."""
    out = []
    for block in re.split(r"\n\s*\n", md.strip()):
        lines = block.strip().splitlines()
        if lines and all(line.startswith("|") for line in lines):
            cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
            rows = [c for c in cells if not all(re.fullmatch(r":?-+:?", x) for x in c)]
            head, rest = rows[0], rows[1:]
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in head) + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rest)
                       + "</tbody></table>")
        elif lines:
            out.append("<p>" + _inline(" ".join(lines)) + "</p>")
    return "\n".join(out)


def page(root: Path, rows: list[dict], failed: list[tuple[str, str]]) -> str:
    """The whole page for the runs ``rows`` (``report.collect``) below ``root`` and its failed jobs."""
    root = Path(root)
    parts = [f"<h1>dng report — {html.escape(str(root.resolve().name) or str(root))}</h1>",
             f"<p>{len(rows)} runs, {len(failed)} failed or unfinished jobs; the numbers are report.csv's. "
             "Click a column header to sort.</p>", "<h2>Runs</h2>", runs_table(rows)]
    fronts = [(name, data_uri(root / name)) for name in ("pareto_kl.png", "pareto_fid.png")]
    if any(uri for _, uri in fronts):
        parts.append("<h2>Safety–quality fronts</h2><p>Forbidden rate (95 % interval) against class balance and "
                     "FID (± s.e. where recorded), one curve per method ordered by scale.</p><div class=\"fronts\">"
                     + "".join(f'<img alt="{n}" src="{u}">' for n, u in fronts if u) + "</div>")
    compare_md = root / "compare.md"
    if compare_md.is_file():
        text = compare_md.read_text(errors="replace")
        keep = text.split("**Class histogram**")[0]  # the matched-safety tables and claims
        parts.append("<h2>Matched safety (dng compare)</h2>" + markdown_html(keep))
        uri = data_uri(root / "compare.png")
        if uri:
            parts.append(f'<p><img alt="compare.png" src="{uri}" style="max-width:100%"></p>')
    grids = []
    for r in rows[:MAX_GRIDS]:
        uri = data_uri(root / r["run"] / "samples.png")
        if uri:
            caption = f"{r['label']} {fmt(r.get('guidance_scale'), 4)} — {r['run']}"
            grids.append(f'<figure><img alt="samples of {html.escape(r["run"], quote=True)}" src="{uri}">'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    if grids:
        more = f" (the first {MAX_GRIDS} runs)" if len(rows) > MAX_GRIDS else ""
        parts.append(f"<h2>Samples{more}</h2>" + "".join(grids))
    if failed:
        parts.append(f"<h2>Failed or unfinished jobs ({len(failed)})</h2><ul class=\"failed\">"
                     + "".join(f"<li><code>{html.escape(job)}</code>: {html.escape(why)}</li>" for job, why in failed)
                     + "</ul>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>dng report</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts)
            + f"\n<script>{SCRIPT}</script>\n</body></html>\n")
