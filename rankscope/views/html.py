"""``report.html``: summary lines, every plot (embedded as base64 PNG) and the recommendation on one
self-contained page that reads offline (no scripts, no external files)."""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path

from rankscope.io.atomic import write_text

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
pre{background:#f6f8fa;padding:.8em;border-radius:6px;overflow-x:auto;font-size:.85em;line-height:1.35}
img{max-width:100%;border:1px solid #eee;margin:.5em 0} figure{margin:1em 0} figcaption{color:#666;font-size:.85em}
.meta{color:#666;font-size:.9em} p.views{max-width:60em;line-height:1.45}
.figs{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start} .figs figure{flex:1 1 440px;margin:0}
"""

# The two views every report shows side by side, in two sentences (the README has the details).
TWO_VIEWS = (
    "The per-rank view measures each LoRA slot's update scale·‖b_i‖·‖a_i‖: it is the BeamLoRA paper's measure and "
    "what BeamLoRA prunes and expands, but it depends on how the update happens to be split between A and B. "
    "The spectral view takes the singular values of the whole update ΔW = scale·B·A, which no change of basis "
    "alters, and counts how many directions the update really uses (k95: the directions holding 95% of its energy)."
)


@dataclass
class Section:
    """One heading with text lines (shown as preformatted terminal output) and plots."""

    title: str
    lines: list[str] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    paragraphs: list[str] = field(default_factory=list)  # prose shown before the lines


def _image(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    name = html.escape(Path(path).name)
    return (f'<figure><img alt="{name}" src="data:image/png;base64,{data}">'
            f"<figcaption>{name}</figcaption></figure>")


def render(title: str, sections: list[Section], subtitle: str = "") -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if subtitle:
        parts.append(f"<p class='meta'>{html.escape(subtitle)}</p>")
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts.extend(f"<p class='views'>{html.escape(text)}</p>" for text in section.paragraphs)
        if section.lines:
            parts.append("<pre>" + html.escape("\n".join(section.lines)) + "</pre>")
        if section.images:
            parts.append("<div class='figs'>" + "".join(_image(path) for path in section.images) + "</div>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(path: str | os.PathLike, title: str, sections: list[Section], subtitle: str = "") -> Path:
    """Write the page atomically and return its path."""
    path = Path(path)
    write_text(path, render(title, sections, subtitle))
    return path
