"""The report's HTML pieces: the style, tables, embedded PNG figures and a section with its empty state.

Plots are embedded as base64 data URIs, so the page is one file that opens offline; every text
taken from the outputs is escaped.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Sequence

from unlearn_lens.core import outputs

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:1.5rem;color:#1d232a}
h1{margin-bottom:.2rem} h2{border-bottom:2px solid #e3e7ec;padding-bottom:.3rem;margin-top:2.2rem}
table{border-collapse:collapse;margin:1rem 0;font-size:.92rem} th,td{border:1px solid #d5dbe1;padding:.35rem .6rem;text-align:left}
th{background:#f1f4f7} td.num{font-variant-numeric:tabular-nums;text-align:right} tr.group td{background:#fafbfc;font-weight:600}
.figs{display:flex;flex-wrap:wrap;gap:1rem} figure{margin:0;max-width:48%} figure img{max-width:100%;border:1px solid #e3e7ec}
figcaption{font-size:.8rem;color:#5b6670} .muted{color:#5b6670} .bad{color:#b42318} details{margin:.6rem 0}
nav a{margin-right:1rem}
"""


def muted(text: str) -> str:
    """A grey paragraph (``text`` is HTML)."""
    return f"<p class='muted'>{text}</p>"


def section(anchor: str, title: str, intro: str, body: str | None, empty: str = "") -> str:
    """An ``<h2>`` section: title, intro, then ``body``, or the ``empty`` note when ``body`` is None.

    The one place a section says how to get results it does not have yet (``intro`` and ``empty``
    are HTML; ``title`` too).
    """
    return f"<h2 id='{anchor}'>{title}</h2>{muted(intro)}{muted(empty) if body is None else body}"


def png_figure(png: bytes, caption: str, alt: str | None = None, style: str = "") -> str:
    """A PNG embedded as a data URI, with its caption (both texts escaped)."""
    data = base64.b64encode(png).decode("ascii")
    alt = html.escape(caption if alt is None else alt)
    attributes = f' style="{style}"' if style else ""
    return (f'<figure{attributes}><img alt="{alt}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def figures(directory: Path, folders: Sequence[str]) -> str:
    """Every PNG in ``directory/<folder>/`` of a folder marked complete, one heading a folder; a note when
    there are none."""
    parts = []
    for folder in folders:
        if not outputs.is_complete(directory / folder):
            continue
        pngs = sorted((directory / folder).glob("*.png"))
        if pngs:
            images = "".join(png_figure(p.read_bytes(), f"{p.parent.name}/{p.name}") for p in pngs)
            parts.append(f"<h3>{html.escape(folder)}</h3><div class='figs'>{images}</div>")
    return "".join(parts) or muted("No plots yet.")


def table(rows: list[dict[str, str]], columns: Sequence[str], group_column: str | None = None) -> str:
    """An HTML table of ``columns``; with ``group_column``, a heading row whenever its value changes."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns if c != group_column)
    body, group = [], None
    for row in rows:
        if group_column and row[group_column] != group:
            group = row[group_column]
            body.append(f"<tr class='group'><td colspan='{len(columns) - 1}'>{html.escape(group)}</td></tr>")
        cells = "".join(f"<td class='{'num' if i else ''}'>{html.escape(str(row.get(c, '')))}</td>"
                        for i, c in enumerate(c for c in columns if c != group_column))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
