"""``report.html``: the verdict as a sentence, the key figures and one row per module in tables that sort
when a header is clicked, every plot (embedded as base64 PNG), and the terminal text in a collapsed block, on
one self-contained page that reads offline (inline style and script, nothing fetched)."""

from __future__ import annotations

import base64
import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rankscope.io.atomic import write_text

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
pre{background:#f6f8fa;padding:.8em;border-radius:6px;overflow-x:auto;font-size:.85em;line-height:1.35}
img{max-width:100%;border:1px solid #eee;margin:.5em 0} figure{margin:1em 0} figcaption{color:#666;font-size:.85em}
.meta{color:#666;font-size:.9em} p.views{max-width:60em;line-height:1.45}
.figs{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start} .figs figure{flex:1 1 440px;margin:0}
p.lead{font-size:1.12em;line-height:1.5;max-width:60em;background:#f3f7fb;border-left:4px solid #2c6fb7;padding:.6em .9em}
.tablewrap{overflow-x:auto;margin:.8em 0} table{border-collapse:collapse;font-size:.85em}
th,td{padding:.25em .6em;border-bottom:1px solid #e4e4e4;text-align:right;white-space:nowrap}
th{background:#f6f8fa;position:sticky;top:0} th.sortable{cursor:pointer} th.sortable:hover{background:#e8eef5}
td.text,th.text{text-align:left} caption{text-align:left;color:#666;font-size:.9em;padding:.3em 0}
details{margin:1em 0} summary{cursor:pointer;color:#2c6fb7}
"""

# Sorts a table by the clicked column: numbers numerically (blank last), text alphabetically; again reverses.
SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.classList.add("sortable");
    th.title = "click to sort";
    th.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var up = th.dataset.dir !== "asc";
      table.querySelectorAll("th").forEach(function (h) { delete h.dataset.dir; });
      th.dataset.dir = up ? "asc" : "desc";
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (isNaN(nx) || isNaN(ny)) ? (isNaN(nx) - isNaN(ny) || String(x).localeCompare(String(y)))
                                         : nx - ny;
        return up ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""

# The two views every report shows side by side, in two sentences (the README has the details).
TWO_VIEWS = (
    "The per-rank view measures each LoRA slot's update scale·‖b_i‖·‖a_i‖: it is the BeamLoRA paper's measure and "
    "what BeamLoRA prunes and expands, but it depends on how the update happens to be split between A and B. "
    "The spectral view takes the singular values of the whole update ΔW = scale·B·A, which no change of basis "
    "alters, and counts how many directions the update really uses (k95: the directions holding 95% of its energy)."
)


@dataclass
class Table:
    """A table that sorts when a header is clicked; a cell is a string, a number or None (shown blank)."""

    headers: list[str]
    rows: list[list[Any]]
    caption: str = ""
    digits: int = 3


@dataclass
class Section:
    """One heading: a lead sentence, prose, tables, plots, and the terminal text (collapsed when ``collapse``)."""

    title: str
    lines: list[str] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    paragraphs: list[str] = field(default_factory=list)  # prose shown before the lines
    lead: str = ""  # the one sentence a reader came for, shown first
    tables: list[Table] = field(default_factory=list)
    collapse: bool = False  # the terminal text in a <details> block


def _image(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    name = html.escape(Path(path).name)
    return (f'<figure><img alt="{name}" src="data:image/png;base64,{data}">'
            f"<figcaption>{name}</figcaption></figure>")


def _cell(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "<td data-v=''></td>"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        shown = f"{value:.{digits}f}" if isinstance(value, float) and not float(value).is_integer() else f"{value:g}"
        return f"<td data-v='{value!r}'>{shown}</td>"
    text = html.escape(str(value))
    return f"<td class='text' data-v='{text}'>{text}</td>"


def _table(table: Table) -> str:
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in table.rows)
               for i in range(len(table.headers))]
    head = "".join(f"<th class='{'' if numeric[i] else 'text'}'>{html.escape(h)}</th>"
                   for i, h in enumerate(table.headers))
    body = "".join("<tr>" + "".join(_cell(v, table.digits) for v in row) + "</tr>" for row in table.rows)
    caption = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
    return (f"<div class='tablewrap'><table class='sortable'>{caption}<thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table></div>")


def render(title: str, sections: list[Section], subtitle: str = "") -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if subtitle:
        parts.append(f"<p class='meta'>{html.escape(subtitle)}</p>")
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.lead:
            parts.append(f"<p class='lead'>{html.escape(section.lead)}</p>")
        parts.extend(_table(table) for table in section.tables)
        parts.extend(f"<p class='views'>{html.escape(text)}</p>" for text in section.paragraphs)
        if section.images:
            parts.append("<div class='figs'>" + "".join(_image(path) for path in section.images) + "</div>")
        if section.lines:
            text = "<pre>" + html.escape("\n".join(section.lines)) + "</pre>"
            parts.append(f"<details><summary>The terminal text</summary>{text}</details>" if section.collapse else text)
    parts.append(f"<script>{SORT_SCRIPT}</script></body></html>\n")
    return "\n".join(parts)


def write_report(path: str | os.PathLike, title: str, sections: list[Section], subtitle: str = "") -> Path:
    """Write the page atomically and return its path."""
    path = Path(path)
    write_text(path, render(title, sections, subtitle))
    return path
