"""Write a Summary as one self-contained HTML page: inline CSS, SVG and a little JS, no network.

The page must open from a laptop after ``scp`` and stay small whatever the log's size: every
list drawn is capped (rows, marks, groups), what is capped is said on the page, and the blocks a
click can open travel once, as JSON, in the page itself.
"""

from __future__ import annotations

import html
import json
import time
from typing import Dict, List, Optional, Sequence

from .summary import LEVELS, Mark, ProcessRow, Summary

__all__ = ["render"]

MAX_ROWS = 1000
MAX_MARKS = 3000
BLOCK_BUDGET = 1_200_000  # characters of blocks a click can open; beyond, the tooltip text
WIDTH, LABEL, ROW = 1100, 230, 16
COLOURS = {"DEBUG": "#9aa5b1", "INFO": "#4c8bf5", "WARNING": "#f0a202", "ERROR": "#d7263d", "CRITICAL": "#7b0828"}

CSS = """
body{font:13px/1.4 system-ui,sans-serif;margin:16px;color:#1d2329;background:#fff}
h1{font-size:20px}h2{font-size:16px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:6px 0}td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
th{background:#f4f6f8}td.n{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#7a4b00;background:#fff6e0;padding:4px 8px;margin:4px 0}
svg text{font:11px system-ui,sans-serif}
.mk{cursor:pointer}.mk:hover{stroke:#000;stroke-width:1}
#panel{position:fixed;right:0;top:0;bottom:0;width:46%;background:#fbfbfb;border-left:2px solid #888;
 padding:10px;overflow:auto;display:none;box-shadow:-4px 0 12px rgba(0,0,0,.15)}
#panel pre{white-space:pre-wrap;font:12px/1.35 ui-monospace,monospace}
#close{float:right;cursor:pointer}
code{font:12px ui-monospace,monospace}
"""

JS = """
(function(){
  var blocks = JSON.parse(document.getElementById('blocks').textContent);
  var panel = document.getElementById('panel'), body = document.getElementById('panel-body');
  document.addEventListener('click', function(ev){
    var el = ev.target.closest ? ev.target.closest('[data-k]') : null;
    if (!el) return;
    body.textContent = blocks[+el.getAttribute('data-k')];
    panel.style.display = 'block';
  });
  document.getElementById('close').addEventListener('click', function(){ panel.style.display = 'none'; });
})();
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _clock(t: Optional[float], millis: bool = True) -> str:
    if t is None:
        return "-"
    text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    return f"{text}.{int((t % 1) * 1000):03d}" if millis else text


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.3f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


class _Blocks:
    """The texts a click can open, indexed by ``data-k``; bounded by BLOCK_BUDGET."""

    def __init__(self) -> None:
        self.texts: List[str] = []
        self.size = 0

    def add(self, text: str, fallback: str) -> int:
        if self.size + len(text) > BLOCK_BUDGET:
            text = fallback + "\n  (the block is not kept: the page's size budget is spent)"
        self.size += len(text)
        self.texts.append(text)
        return len(self.texts) - 1

    def json(self) -> str:
        # In a <script> element only "</" can end it early; \\u003c keeps the JSON valid.
        return json.dumps(self.texts, ensure_ascii=False).replace("<", "\\u003c")


def _sample_marks(rows: Sequence[ProcessRow]) -> Dict[int, List[Mark]]:
    """At most MAX_MARKS marks on the page, shared evenly among the rows that have some."""
    total = sum(len(r.marks) for r in rows)
    if total <= MAX_MARKS:
        return {id(r): sorted(r.marks, key=lambda m: m.created) for r in rows}
    share = max(1, MAX_MARKS // max(1, sum(1 for r in rows if r.marks)))
    out = {}
    for r in rows:
        marks = sorted(r.marks, key=lambda m: m.created)
        if len(marks) > share:
            step = len(marks) / share
            marks = [marks[int(i * step)] for i in range(share)]
        out[id(r)] = marks
    return out


def _timeline(s: Summary, blocks: _Blocks, notes: List[str]) -> str:
    rows = sorted(s.processes.values(), key=lambda r: (r.first, r.pid))
    if len(rows) > MAX_ROWS:
        keep = {id(r) for r in sorted(rows, key=lambda r: (r.death is None, -r.marked, -r.count))[:MAX_ROWS]}
        notes.append(f"The timeline shows {MAX_ROWS} of {len(rows)} processes (those that died, then those "
                     f"with the most warnings and errors, then the busiest).")
        rows = [r for r in rows if id(r) in keep]
    if s.processes_over:
        notes.append(f"{s.processes_over} records of processes beyond the first {len(s.processes)} are counted "
                     f"but not drawn.")
    t0, t1 = s.first or 0.0, s.last or 0.0
    span = max(t1 - t0, 1e-3)
    plot = WIDTH - LABEL - 20

    def x(t: float) -> float:
        return LABEL + (t - t0) / span * plot

    sampled = _sample_marks(rows)
    shown = sum(len(v) for v in sampled.values())
    seen = sum(r.marked for r in rows)
    if shown < seen:
        notes.append(f"The timeline marks {shown} of {seen} warnings and errors (a uniform sample per "
                     f"process); the groups table counts them all.")
    height = ROW * len(rows) + 30
    out = [f'<svg id="timeline" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" '
           f'xmlns="http://www.w3.org/2000/svg">']
    for i, r in enumerate(rows):
        y = 20 + i * ROW
        label = f"{r.process}:{r.pid}"
        out.append(f'<g class="row" data-process="{_e(label)}">')
        if i % 2:
            out.append(f'<rect x="0" y="{y}" width="{WIDTH}" height="{ROW}" fill="#f7f8fa"/>')
        out.append(f'<text x="4" y="{y + 12}">{_e(label[:34])}<title>{_e(label)}: {r.count} records, '
                   f'{_clock(r.first)} to {_clock(r.last)}</title></text>')
        colour = "#8c6bb1" if r.listener else "#7fa7d9"
        x0 = x(r.first)
        out.append(f'<rect class="bar" x="{x0:.1f}" y="{y + 4}" width="{max(x(r.last) - x0, 2):.1f}" height="8" '
                   f'fill="{colour}"><title>{_e(label)}: {r.count} records, {_clock(r.first)} to '
                   f'{_clock(r.last)}</title></rect>')
        for m in sampled[id(r)]:
            k = blocks.add(m.block, m.title)
            out.append(f'<rect class="mk" data-k="{k}" x="{x(m.created) - 1:.1f}" y="{y + 1}" width="3" height="14" '
                       f'fill="{COLOURS.get(m.level, "#333")}"><title>{_e(m.title)}</title></rect>')
        if r.death is not None:
            d = r.death
            k = blocks.add(d.block, d.message)
            dx = x(d.created)
            anchor = "end" if dx > WIDTH - 120 else "start"
            tx = dx - 8 if anchor == "end" else dx + 8
            out.append(f'<g class="mk death" data-k="{k}"><path d="M{dx - 6:.1f},{y + 1} L{dx + 6:.1f},{y + 1} '
                       f'L{dx:.1f},{y + 14} Z" fill="#000"/><text x="{tx:.1f}" y="{y + 12}" text-anchor="{anchor}" '
                       f'font-weight="bold">{_e(d.cause or d.how)}</text><title>{_e(d.message)}</title></g>')
        out.append("</g>")
    out.append(f'<text x="{LABEL}" y="12">{_e(_clock(t0))}</text>'
               f'<text x="{WIDTH - 20}" y="12" text-anchor="end">{_e(_clock(t1))}</text></svg>')
    return "".join(out)


def _rates(s: Summary) -> str:
    series = s.series()
    if not series:
        return "<p>(no records)</p>"
    h, plot = 160, WIDTH - LABEL - 20
    peak = max(sum(c.values()) for _, c in series) / s.bin_width or 1.0
    bw = plot / len(series)
    out = [f'<svg id="rates" width="{WIDTH}" height="{h + 40}" xmlns="http://www.w3.org/2000/svg">'
           f'<text x="4" y="16">{peak:,.0f} records/s</text><text x="4" y="{h + 10}">0</text>']
    for i, (start, c) in enumerate(series):
        y = float(h + 10)
        tip = ", ".join(f"{lvl} {c[lvl]}" for lvl in LEVELS if c[lvl])
        for lvl in LEVELS:
            if c[lvl]:
                bh = c[lvl] / s.bin_width / peak * h
                y -= bh
                out.append(f'<rect x="{LABEL + i * bw:.1f}" y="{y:.1f}" width="{max(bw - 0.3, 0.5):.1f}" '
                           f'height="{bh:.1f}" fill="{COLOURS[lvl]}"><title>{_e(_clock(start))} '
                           f'(+{s.bin_width:g} s): {tip}</title></rect>')
    legend = "".join(f'<rect x="{LABEL + 90 * j}" y="{h + 20}" width="10" height="10" fill="{COLOURS[lvl]}"/>'
                     f'<text x="{LABEL + 90 * j + 14}" y="{h + 29}">{lvl}</text>' for j, lvl in enumerate(LEVELS))
    out.append(legend + "</svg>")
    out.append(f"<p>One bar per {s.bin_width:g} s.</p>")
    return "".join(out)


def _table(head: Sequence[str], rows: Sequence[Sequence[object]], cls: str, numeric: Sequence[int] = ()) -> str:
    out = [f'<table class="{cls}"><tr>' + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="n">{_e(v)}</td>' if i in numeric else f"<td>{_e(v)}</td>"
                                    for i, v in enumerate(row)) + "</tr>")
    out.append("</table>")
    return "".join(out)


def render(s: Summary, title: str, sources: Sequence[str], problems: Sequence[str]) -> str:
    """The whole page as text."""
    blocks = _Blocks()
    notes: List[str] = []
    timeline = _timeline(s, blocks, notes)
    span = (s.last - s.first) if s.first is not None and s.last is not None else 0.0
    run = [("first record", _clock(s.first)), ("last record", _clock(s.last)), ("duration", _duration(span)),
           ("records", f"{s.records:,}"), ("processes", f"{len(s.processes):,}"),
           ("files read", ", ".join(sources))]
    run += [(f"{lvl}", f"{s.levels[lvl]:,}") for lvl in LEVELS if s.levels[lvl]]
    run += [(f"level {lvl}", f"{n:,}") for lvl, n in s.levels.items() if lvl not in LEVELS]
    for st in s.stops:
        run.append((f"mplog {st['how']} at {_clock(st['time'])}",  # type: ignore[arg-type]
                    f"{st['written']:,} written, {st['dropped']:,} dropped, {st['diverted']:,} diverted to "
                    f"stderr, {st['lost']:,} lost"))
    if not s.stops:
        run.append(("stop report", "none in the log (the run did not stop cleanly, or is still running)"))
    run.append(("listener restarts", str(len(s.restarts))))
    groups = sorted(s.groups.values(), key=lambda g: -g.count)
    group_rows = [(g.count, g.level, g.logger, g.template, _clock(g.first), _clock(g.last),
                   ", ".join(p for p, _ in g.processes.most_common(5)) + (f" (+{len(g.processes) - 5})"
                                                                        if len(g.processes) > 5 else ""))
                  for g in groups[:300]]
    if len(groups) > 300 or s.groups_over:
        notes.append(f"The groups table shows the 300 largest of {len(groups)} groups"
                     + (f"; {s.groups_over:,} warnings and errors fell beyond {len(groups)} groups and are "
                        f"not grouped" if s.groups_over else "") + ".")
    death_rows = []
    for d in s.deaths:
        death_rows.append(f'<tr><td>{_e(_clock(d.created))}</td><td>{_e(d.process)}</td><td class="n">{d.pid}</td>'
                          f'<td>{_e(d.level)}</td><td>{_e(d.cause)}</td><td>{_e(d.message)}'
                          f'<details><summary>block</summary><pre>{_e(d.block)}</pre></details></td></tr>')
    if s.deaths_over:
        notes.append(f"{s.deaths_over} more deaths are in the log than the {len(s.deaths)} listed.")
    deaths = ('<table class="deaths"><tr><th>time</th><th>process</th><th>pid</th><th>level</th><th>cause</th>'
              '<th>record</th></tr>' + "".join(death_rows) + "</table>") if death_rows else "<p>No process died.</p>"
    restarts = _table(("time", "notice"), [(_clock(t), m) for t, m in s.restarts], "restarts") if s.restarts else ""
    top_loggers = _table(("logger", "records"), [(k, f"{v:,}") for k, v in s.loggers.most_common(20)], "loggers", (1,))
    top_procs = _table(("process", "pid", "records", "warnings+errors", "first", "last"),
                       [(r.process, r.pid, f"{r.count:,}", f"{r.marked:,}", _clock(r.first), _clock(r.last))
                        for r in s.top_processes(20)], "procs", (1, 2, 3))
    trouble = "".join(f'<p class="note problem">{_e(p)}</p>' for p in problems)
    capped = "".join(f'<p class="note">{_e(n)}</p>' for n in notes)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width"><style>{CSS}</style></head><body>'
            f'<h1>{_e(title)}</h1>{trouble}'
            f'<h2>The run</h2>{_table(("", ""), run, "run")}{restarts}{capped}'
            f'<h2>Timeline</h2><p>One row per process, a bar from its first record to its last; marks are its '
            f'warnings and errors, a black triangle its death. Hover for the record, click for the whole block.</p>'
            f'{timeline}'
            f'<h2>Records per second</h2>{_rates(s)}'
            f'<h2>Warnings and errors by template</h2>'
            f'{_table(("count", "level", "logger", "template", "first", "last", "processes"), group_rows, "groups", (0,))}'
            f'<h2>Deaths</h2>{deaths}'
            f'<h2>Top loggers</h2>{top_loggers}<h2>Top processes</h2>{top_procs}'
            f'<div id="panel"><span id="close" title="close">✕</span><pre id="panel-body"></pre></div>'
            f'<script type="application/json" id="blocks">{blocks.json()}</script>'
            f'<script>{JS}</script></body></html>')
