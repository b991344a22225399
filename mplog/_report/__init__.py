"""``python -m mplog report``: one self-contained HTML page of what a run did, from its full log.

reader   streams the full log and its rotated copies into blocks (a header and its lines);
summary  folds the blocks into bounded aggregates (time bins, processes, groups, deaths);
page     writes those aggregates as one HTML file (inline CSS, SVG and JS; nothing fetched).

A room of its own (tests/test_layers.py): the report runs in no process of the pipeline, it
reads the listener's files after the run, so it may import ``_listener`` (their names and
rotation order) and ``_common``, and nothing of the pipeline imports it.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, TextIO

__all__ = ["report_command", "EXIT_BAD_INPUT"]

EXIT_BAD_INPUT = 2


def report_command(directory: str, name: str = "run", output: Optional[str] = None,
                   err: Optional[TextIO] = None) -> int:
    """Write the report of ``directory``'s full log ``name``. 0 on success; 2 (with a message on
    stderr) when the input is bad: no log, an unparseable line (no page), or a corrupt
    compressed copy or truncated last block (the page is written from the rest)."""
    from .page import render
    from .reader import LogReader, ReportError
    from .summary import Summary

    err = err or sys.stderr
    out = output or os.path.join(directory, f"{name}.report.html")
    try:
        reader = LogReader(directory, name)
        summary = Summary().feed(reader)
    except ReportError as exc:
        print(f"mplog report: {exc}", file=err)
        return EXIT_BAD_INPUT
    page = render(summary, f"mplog report: {name} in {os.path.abspath(directory)}",
                  [os.path.basename(p) for p in reader.files], reader.problems)
    try:
        with open(out, "w", encoding="utf-8") as f:
            f.write(page)
    except OSError as exc:
        print(f"mplog report: cannot write {out}: {exc.strerror or exc}", file=err)
        return EXIT_BAD_INPUT
    print(f"mplog report: {summary.records:,} records, {len(summary.processes):,} processes, "
          f"{len(summary.deaths)} deaths -> {out} ({len(page.encode()):,} bytes)")
    for problem in reader.problems:
        print(f"mplog report: {problem}", file=err)
    return EXIT_BAD_INPUT if reader.problems else 0
