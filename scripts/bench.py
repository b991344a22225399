#!/usr/bin/env python3
"""Benchmark mplog against the ways Python programs usually log from several processes.

    python scripts/bench.py                                   # P=2 and P=8, 20000 records each, fork
    python scripts/bench.py --start-method spawn --procs 2
    python scripts/bench.py --only mplog,stdlib-queue --records 5000 --json out.json --markdown

Setups (all run in the same invocation, one after the other, each in a fresh "coordinator"
process so that no setup inherits another's logging state):

  floor                   Logger.info into a NullHandler: the cost no handler can avoid
  filehandler             every worker appends to one file with its own FileHandler (unsafe)
  stdlib-queue            QueueHandler -> multiprocessing.Queue -> QueueListener thread -> FileHandler
  stdlib-cookbook         QueueHandler -> multiprocessing.Queue -> listener *process* -> FileHandler
  mplog                   mplog.LogService(level="INFO", overflow="block"): both files written
  loguru                  loguru logger.add(file, enqueue=True)                    (if importable)
  concurrent-log-handler  ConcurrentRotatingFileHandler in every worker               (if importable)
  multiprocessing-logging install_mp_handler() around a FileHandler (fork only)      (if importable)

Workers are ``multiprocessing`` processes of the chosen start method that first run what a pool
initializer would (for mplog: ``svc.pool_kwargs()``), then log 100 warm-up records, wait at a
barrier and are released together by one Event (plain Processes rather than a Pool, so that each
worker gets exactly one task and the barrier cannot deadlock). Every record is
``logger.info("w%d processed item %d of %d: loss=%.6f", wid, i, n, x)`` (the loguru equivalent
for loguru), with the stdlib format ``%(asctime)s %(levelname)s %(processName)s %(name)s:
%(message)s``.

What is measured, per setup and worker count P (each worker logs N records):

* records/s: P*N / (time from the moment the workers are released together, after start-up and
  a warm-up of 100 records each, until every record is in the file). "In the file" means: the
  workers returned (file handlers), the listener drained up to a sentinel (queue setups),
  ``svc.flush()`` returned True (mplog), ``logger.complete()`` returned (loguru).
* records/s to stop(): the same records over that time plus the setup's stop (``svc.stop()``,
  ``QueueListener.stop()``, handlers closed), timed on its own after the files are verified:
  the end of a user's program, which waits for both.
* caller cost: every logging call is timed on its own with ``time.perf_counter_ns()``; each
  worker reports its median and p99; the table shows the median over workers. The timer's own
  overhead (measured, printed in the header) is included, not subtracted.
* writer CPU µs/record: CPU of whatever writes the file — the listener process (psutil
  ``cpu_times`` of its pid, before and after) plus every thread of the coordinator process other
  than its main thread (the QueueListener/loguru/multiprocessing-logging writer threads, mplog's
  supervisor). Workers' CPU µs/record: ``process_time`` of every worker (all its threads, feeder
  threads included), summed.
* peak RSS: ``VmHWM`` of each worker (max over workers) and of the writer (the listener process,
  or the coordinator process when the writer is a thread: marked ``*``); both peaks are reset
  (``/proc/PID/clear_refs``) just before the workers are released. For mplog both include the
  pages of the spool's rings that the process touched (shared memory on tmpfs: a worker its own
  ring, the listener every ring it read); the spool's own usage at the flush is in the notes.
  In brackets after the worker's peak: the shared pages it mapped when its last call returned
  (``RssShmem``, max over workers): for mplog, its ring's backlog, which is bounded by queue_size.
* caller overhead vs filehandler overhead: (mplog - floor) / (filehandler - floor) of the
  median call, the measure of issue 14 (<= 0.5 is the target).
* verification: every record carries a (worker, item) pair and a checkable value; the output
  file(s) are parsed and each record must be there exactly once and intact. lost = missing,
  dup = extra copies, torn = lines/blocks that are not a well-formed record. For mplog both the
  full log (blocks) and the simplified log (lines) are checked and the counts are added up, and
  after ``stop()`` the service's spool directory must be gone (one left behind, by a stop that
  could not drain or a coordinator killed at the timeout, is noted and removed by the driver).

The machine may be shared: for each run the CPU that *other* processes used during the
measurement window is printed ("noise"; "-" for windows under 0.5 s, which /proc/stat's 10 ms
ticks cannot resolve); use --repeat K to run everything K times (interleaved)
and keep the run with the median records/s. The header says which mplog was measured (path, git
commit, uncommitted changes).

Every setup is bounded by --timeout seconds: its whole process group is killed and the setup is
reported as failed. Nothing here asserts on speed: this is a measurement script.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from typing import Any, Dict, List, Optional, Tuple

# scripts/ is on sys.path when a script runs. The benchmark's other parts: bench_verify (the
# records and how the files are checked), bench_setups (each peer's setup), bench_run (the
# coordinator process of one setup, its workers, the driver that bounds it).
from _toolkit import mb, mplog_source
from bench_run import child_main, run_setup
from bench_verify import WARMUP

SETUPS = ["floor", "filehandler", "stdlib-queue", "stdlib-cookbook", "mplog",
          "loguru", "concurrent-log-handler", "multiprocessing-logging"]
# mplog with its compiled code turned off (MPLOG_PURE_PYTHON=1): what an install without a
# compiler gets. Only with --only: it measures mplog against itself, not against the peers.
EXTRA_SETUPS = ["mplog-python"]
PEERS = {  # optional setup -> (import name, pip name)
    "loguru": ("loguru", "loguru"),
    "concurrent-log-handler": ("concurrent_log_handler", "concurrent-log-handler"),
    "multiprocessing-logging": ("multiprocessing_logging", "multiprocessing-logging"),
}
QUEUE_PEERS = ("stdlib-queue", "stdlib-cookbook", "loguru", "multiprocessing-logging")


def skip_reason(setup: str, start_method: str) -> Optional[str]:
    if setup in PEERS:
        import importlib.util
        module, pip_name = PEERS[setup]
        if importlib.util.find_spec(module) is None:
            return f"{module} is not importable (pip install {pip_name}, or '.[bench]')"
    if setup == "multiprocessing-logging" and start_method != "fork":
        return "works with the fork start method only"
    return None


def versions() -> Dict[str, str]:
    from importlib import metadata
    out = {}
    for dist in ("mplog", "loguru", "concurrent-log-handler", "multiprocessing-logging", "psutil"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _fmt(value: Any, spec: str = ",.0f", none: str = "-") -> str:
    if value is None:
        return none
    return format(value, spec)


def row_cells(r: Dict[str, Any]) -> List[str]:
    if not r.get("ok"):
        return [r["setup"], "FAILED", "", "", "", "", "", "", "", ""]
    v = r.get("verify")
    ldt = "n/a" if v is None else f"{v['lost']}/{v['dup']}/{v['torn']}"
    star = "*" if r.get("writer") == "thread" else ""
    return [
        r["setup"],
        _fmt(r["rate"]),
        _fmt(r.get("rate_to_stop")),
        _fmt(r["caller_med_us"], ".2f"),
        _fmt(r["caller_p99_us"], ".2f"),
        _fmt(r["writer_cpu_us"], ".1f") + (star if r["writer_cpu_us"] is not None else ""),
        _fmt(r["worker_cpu_us"], ".1f"),
        _fmt(r["worker_rss_mb"], ".1f") + (f" ({r['worker_shm_mb']:.1f})" if r.get("worker_shm_mb") else ""),
        _fmt(r["writer_rss_mb"], ".1f") + (star if r["writer_rss_mb"] is not None else ""),
        ldt,
    ]


HEADERS = ["setup", "records/s", "records/s to stop()", "call med µs", "call p99 µs", "writer CPU µs/rec", "workers CPU µs/rec",
           "worker RSS MB (shm)", "writer RSS MB", "lost/dup/torn"]


def text_table(rows: List[Dict[str, Any]]) -> str:
    cells = [HEADERS] + [row_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADERS))]
    lines = []
    for k, c in enumerate(cells):
        parts = [c[0].ljust(widths[0])] + [c[i].rjust(widths[i]) for i in range(1, len(c))]
        lines.append("  ".join(parts).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(HEADERS) - 1)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(row_cells(r)) + " |")
    return "\n".join(lines)


def ratios(rows: List[Dict[str, Any]]) -> List[Tuple[str, str]]:
    by = {r["setup"]: r for r in rows if r.get("ok")}
    m = by.get("mplog")
    if m is None:
        return [("mplog", "no result")]
    out = []

    def ratio(a: Optional[float], b: Optional[float]) -> str:
        return "-" if not a or not b else f"{a / b:.2f}x"
    floor, fh = by.get("floor"), by.get("filehandler")
    out.append(("records/s vs floor", ratio(m["rate"], floor and floor["rate"])
                + (f"  ({m['rate']:,.0f} vs {floor['rate']:,.0f})" if floor else "")))
    peers = [by[p] for p in QUEUE_PEERS if p in by]
    if peers:
        best = max(peers, key=lambda r: r["rate"])
        out.append(("records/s vs best queue-based peer",
                    f"{ratio(m['rate'], best['rate'])}  ({best['setup']} {best['rate']:,.0f}/s)"))
    else:
        out.append(("records/s vs best queue-based peer", "-"))
    out.append(("records/s vs filehandler", ratio(m["rate"], fh and fh["rate"])
                + (f"  ({fh['rate']:,.0f}/s)" if fh else "")))
    out.append(("caller median vs filehandler median", ratio(m["caller_med_us"], fh and fh["caller_med_us"])
                + (f"  ({m['caller_med_us']:.2f} vs {fh['caller_med_us']:.2f} µs)" if fh else "")))
    if floor and fh and fh["caller_med_us"] > floor["caller_med_us"]:
        # Issue 14's measure: what the handler adds to Logger.info, against what a synchronous
        # write adds, both above the floor (a NullHandler), medians in the same kind of worker.
        over = (m["caller_med_us"] - floor["caller_med_us"]) / (fh["caller_med_us"] - floor["caller_med_us"])
        out.append(("caller overhead vs filehandler overhead", f"{over:.2f}x  ("
                    f"{m['caller_med_us'] - floor['caller_med_us']:.2f} vs "
                    f"{fh['caller_med_us'] - floor['caller_med_us']:.2f} µs above the floor)"))
    out.append(("caller p99 vs filehandler p99", ratio(m["caller_p99_us"], fh and fh["caller_p99_us"])
                + (f"  ({m['caller_p99_us']:.2f} vs {fh['caller_p99_us']:.2f} µs)" if fh else "")))
    return out


def ratio_values(rows: List[Dict[str, Any]]) -> Dict[str, float]:
    """The ratios of issue 14's targets as numbers, for rows measured in the same repeat."""
    by = {r["setup"]: r for r in rows if r.get("ok")}
    m, floor, fh = by.get("mplog"), by.get("floor"), by.get("filehandler")
    out: Dict[str, float] = {}
    if m is None:
        return out
    if floor:
        out["records/s vs floor"] = m["rate"] / floor["rate"]
    peers = [by[p] for p in QUEUE_PEERS if p in by]
    if peers:
        out["records/s vs best queue-based peer"] = m["rate"] / max(r["rate"] for r in peers)
    if fh:
        out["records/s vs filehandler"] = m["rate"] / fh["rate"]
        out["caller p99 vs filehandler p99"] = m["caller_p99_us"] / fh["caller_p99_us"]
        if floor and fh["caller_med_us"] > floor["caller_med_us"]:
            out["caller overhead vs filehandler overhead"] = (
                (m["caller_med_us"] - floor["caller_med_us"]) / (fh["caller_med_us"] - floor["caller_med_us"]))
    return out


def paired_ratios(repeats: List[List[Dict[str, Any]]]) -> List[Tuple[str, str]]:
    """Each ratio within each repeat (its setups ran one after the other, under the same noise),
    then the median over repeats: steadier than ratios of medians picked setup by setup."""
    per = [ratio_values(rows) for rows in repeats]
    out = []
    for key in per[0] if per else []:
        values = sorted(p[key] for p in per if key in p)
        med = values[(len(values) - 1) // 2]
        out.append((key, f"{med:.2f}x  (each repeat: {', '.join(f'{v:.2f}' for v in values)})"))
    return out


def notes_for(r: Dict[str, Any]) -> List[str]:
    out = []
    if not r.get("ok"):
        out.append(f"FAILED: {r.get('error')}")
        tb = r.get("traceback")
        if tb:
            out.extend("    " + line for line in tb.strip().splitlines()[-6:])
    v = r.get("verify")
    if v:
        for fname, part in v["files"].items():
            if part["lost"] or part["dup"] or part["torn"] or part["found"] != part["expected"]:
                out.append(f"{fname}: found {part['found']}/{part['expected']}, lost {part['lost']}, "
                           f"dup {part['dup']}, torn {part['torn']}; examples: {part['bad_examples']}")
            if part.get("notices"):
                out.append(f"{fname}: {part['notices']} mplog notice(s): {part['notice_texts'][:2]}")
    for note in r.get("notes") or []:
        out.append(note)
    hf = (r.get("extra") or {}).get("health_at_flush")
    if hf:
        rec = hf.get("records") or {}
        out.append(f"health after flush: written={rec.get('written')} sent={rec.get('sent')} "
                   f"dropped={rec.get('dropped')} lost={rec.get('lost')} restarts={hf.get('restarts')} "
                   f"status={hf.get('status')}")
        q = hf.get("queue") or {}
        if q.get("capacity_bytes"):
            out.append(f"spool after flush: {q.get('rings')} ring(s) of {mb(q['capacity_bytes'])} "
                       f"({q.get('capacity')} records) per process, {mb(q.get('bytes') or 0)} in use")
    for line in r.get("stderr") or []:
        out.append(f"stderr: {line}")
    return out


def pick_median(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    ok = [r for r in runs if r.get("ok")]
    if not ok:
        return runs[-1]
    ok.sort(key=lambda r: r["rate"])
    chosen = dict(ok[(len(ok) - 1) // 2])  # the lower middle for an even count: never flatter
    if len(runs) > 1:
        chosen["repeats"] = [round(r["rate"]) if r.get("ok") else None for r in runs]
    return chosen


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20000, help="records per worker (default 20000)")
    parser.add_argument("--procs", default="2,8", help="worker counts, comma-separated (default 2,8)")
    parser.add_argument("--start-method", default="fork", choices=["fork", "spawn", "forkserver"])
    parser.add_argument("--only", default="", help="comma-separated setups: " + ",".join(SETUPS + EXTRA_SETUPS))
    parser.add_argument("--json", metavar="FILE", help="also write every result as JSON")
    parser.add_argument("--markdown", metavar="FILE", nargs="?", const="-",
                        help="also write the tables as Markdown (to FILE, or to stdout)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per setup (default 300)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run everything K times, interleaved; show the run with the median records/s "
                             "(the lower middle one for an even K)")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        child_main(args._child)
        return 0
    procs_list = [int(p) for p in args.procs.split(",") if p.strip()]
    if not procs_list or any(p < 1 for p in procs_list) or args.records < 1 or args.repeat < 1:
        parser.error("--procs, --records and --repeat must be positive")
    setups = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else list(SETUPS)
    unknown = [s for s in setups if s not in SETUPS + EXTRA_SETUPS]
    if unknown:
        parser.error(f"unknown setup(s): {', '.join(unknown)}; choose from {', '.join(SETUPS + EXTRA_SETUPS)}")

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    header = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "start_method": args.start_method,
        "cores": os.cpu_count(), "cores_usable": affinity,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "records_per_worker": args.records, "procs": procs_list,
        "versions": versions(),
        "mplog_source": mplog_source(),
    }
    print(f"mplog benchmark  {header['date']}")
    print(f"Python {header['python']} ({sys.executable})  {header['platform']}")
    print(f"start method {args.start_method}; cores {header['cores']} (usable {affinity}); "
          f"load average {header['loadavg']}")
    print(f"{args.records} records per worker; workers {procs_list}; warm-up {WARMUP} records per worker; "
          f"timeout {args.timeout:.0f} s per setup; repeats {args.repeat}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in header["versions"].items()))
    print(f"mplog {header['mplog_source']}")
    active = []
    skipped = {}
    for s in setups:
        reason = skip_reason(s, args.start_method)
        if reason:
            skipped[s] = reason
            print(f"skipping {s}: {reason}")
        else:
            active.append(s)
    print("", flush=True)

    runs: Dict[Tuple[str, int], List[Dict[str, Any]]] = {}
    for rep in range(args.repeat):
        for procs in procs_list:
            for s in active:
                label = f"[{rep + 1}/{args.repeat}] " if args.repeat > 1 else ""
                print(f"{label}running {s} with {procs} workers ...", end=" ", flush=True)
                r = run_setup(s, procs, args)
                runs.setdefault((s, procs), []).append(r)
                if r.get("ok"):
                    v = r.get("verify")
                    ldt = "" if v is None else f", lost/dup/torn {v['lost']}/{v['dup']}/{v['torn']}"
                    print(f"{r['rate']:,.0f} records/s{ldt} ({r['wall_s']:.1f} s)", flush=True)
                else:
                    print(f"FAILED ({r.get('error')})", flush=True)

    timer_ns = sorted(r["timer_ns"] for rs in runs.values() for r in rs if r.get("ok") and "timer_ns" in r)
    tables = []
    md = []
    print()
    print("caller cost: every call timed on its own with perf_counter_ns (timer overhead "
          f"{timer_ns[len(timer_ns) // 2] / 1000 if timer_ns else float('nan'):.3f} µs, included); "
          "median over workers of each worker's median / p99")
    print("writer = the listener process (+ the main process's other threads); * = the writer is a thread "
          "of the main process (CPU: its non-main threads; RSS: the main process)")
    for procs in procs_list:
        rows = [pick_median(runs[(s, procs)]) for s in active if (s, procs) in runs]
        title = f"P={procs} workers x {args.records} records = {procs * args.records} records, {args.start_method}"
        print()
        print(title)
        table = text_table(rows)
        print(table)
        rat = ratios(rows)
        print(f"mplog ratios (P={procs}):")
        for k, v in rat:
            print(f"  {k + ':':38s} {v}")
        notes = [(r["setup"], n) for r in rows for n in notes_for(r)]
        if notes:
            print("notes:")
            for setup, n in notes:
                print(f"  {setup}: {n}")
        ok_rows = [r for r in rows if r.get("ok")]
        noise = ", ".join(f"{r['setup']} {_fmt(r.get('foreign_cpu_share'), '.0%')}" for r in ok_rows)
        if ok_rows:
            print("CPU used by other processes on the machine during each measurement (noise): " + noise)
        paired: List[Tuple[str, str]] = []
        if any(r.get("repeats") for r in rows):
            print("records/s of every repeat: " + "; ".join(f"{r['setup']} {r.get('repeats')}" for r in rows))
            repeats = [[runs[(s, procs)][k] for s in active if (s, procs) in runs and len(runs[(s, procs)]) > k]
                       for k in range(args.repeat)]
            paired = paired_ratios(repeats)
            print(f"mplog ratios within each repeat, median over the {args.repeat} repeats (P={procs}):")
            for k, v in paired:
                print(f"  {k + ':':42s} {v}")
        tables.append({"procs": procs, "rows": rows, "ratios": rat, "paired_ratios": paired})
        md.append(f"**{title}**\n\n{markdown_table(rows)}\n\n" + "\n".join(f"- mplog {k}: {v}" for k, v in (paired or rat))
                  + (f"\n- CPU used by other processes during each measurement: {noise}" if ok_rows else ""))

    if args.markdown:
        text = (f"Python {header['python']}, {args.start_method}, {header['cores']} cores, {header['date'][:10]}, "
                f"mplog {header['mplog_source']}; caller cost = median over workers of per-call median/p99; "
                "* = writer is a thread of the main process.\n\n" + "\n\n".join(md) + "\n")
        if args.markdown == "-":
            print()
            print(text)
        else:
            with open(args.markdown, "w") as f:
                f.write(text)
            print(f"\nMarkdown written to {args.markdown}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "skipped": skipped, "tables": tables,
                       "runs": {f"{k[0]}@{k[1]}": v for k, v in runs.items()}}, f, indent=1)
        print(f"JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
