"""``python -m mplog``: ``demo`` runs a small pipeline; ``health`` is a liveness probe;
``spools`` lists (and with ``--clean`` removes) the spools that runs of this user left behind;
``report`` writes one self-contained HTML page of what a run did, from its full log."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_NO_SERVICE = 0, 1, 2


def health_command(directory: str, name: str, max_age: float) -> int:
    """Print the service's health as JSON. 0 healthy; 1 degraded, down or stale; 2 none there."""
    from ._supervisor.supervisor import kernel_status, read_health_file, same_process

    path = Path(directory) / f"{name}.health.json"
    try:
        report = read_health_file(path)
    except FileNotFoundError:
        print(json.dumps({"status": "absent", "reason": f"no health file at {path}"}))
        return EXIT_NO_SERVICE
    except (OSError, ValueError) as exc:
        print(json.dumps({"status": "absent", "reason": f"unreadable health file {path}: {exc}"}))
        return EXIT_NO_SERVICE
    service = report.get("service") or {}
    # A pid is a process only with its create_time: a stale file from a crashed run, whose pid
    # now belongs to someone else, must read as down.
    if report.get("status") != "down" and not same_process(service.get("pid"), service.get("create_time")):
        # The whole report is stale: nothing in it runs any more.
        report["status"] = "down"
        report["state"] = "gone"
        report["reason"] = "the process that wrote this health file is gone"
        listener = report.get("listener")
        if isinstance(listener, dict):
            listener["alive"] = same_process(listener.get("pid"), listener.get("create_time"))
    else:
        listener = report.get("listener")
        if isinstance(listener, dict) and listener.get("status") == "unresponsive":
            # The service reports what the listener publishes of itself; the kernel can say why
            # it stopped publishing (stopped, disk-sleep on a stalled file system...).
            why = kernel_status(listener.get("pid"), listener.get("create_time"))
            if why:
                listener["status"] = f"unresponsive ({why})"
        age = time.time() - float(service.get("updated") or 0)
        if report.get("status") == "healthy" and age > max_age:
            report["status"] = "degraded"
            report["reason"] = f"the health file was last refreshed {age:.1f} s ago"
    print(json.dumps(report, indent=1, sort_keys=True))
    return EXIT_HEALTHY if report.get("status") == "healthy" else EXIT_UNHEALTHY


def spools_command(clean: bool, older_than_days: float, root: Optional[str]) -> int:
    """List this user's spools; ``clean`` removes those whose run is gone and that hold nothing,
    or that are older than ``older_than_days``. Exit 0."""
    from ._common.spool import list_spools, remove_spool

    rows = list_spools(root)
    print(f"{'state':<8} {'unwritten':>9} {'bytes':>10} {'age':>8}  {'owner':>7}  spool -> file set")
    for s in rows:
        state = "running" if s.alive else "orphan"
        if clean and not s.alive and (s.unwritten == 0 or s.age_s >= older_than_days * 86400):
            remove_spool(s.path)
            state = "removed"
        print(f"{state:<8} {s.unwritten:>9} {s.bytes:>10} {s.age_s / 3600:>7.1f}h  {s.owner_pid:>7}  "
              f"{s.path} -> {s.directory}/{s.name}")
    if not rows:
        print("(no spools)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mplog", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a small scientific batch pipeline that logs through mplog")
    demo.add_argument("--workers", type=int, default=4)
    demo.add_argument("--items", type=int, default=400, help="items per stage")
    demo.add_argument("--dir", default="mplog-demo-logs", help="where the logs go")
    demo.add_argument("--start-method", default=None, choices=("fork", "spawn", "forkserver"))
    health = sub.add_parser("health", help="print a service's health; exit 0 healthy, 1 not, 2 none")
    health.add_argument("directory")
    health.add_argument("--name", default="run")
    health.add_argument("--max-age", type=float, default=5.0,
                        help="seconds after which an unrefreshed health file is stale (default 5)")
    spools = sub.add_parser("spools", help="list the spools of this user's runs; --clean removes orphans")
    spools.add_argument("--clean", action="store_true",
                        help="remove orphaned spools that hold nothing, or are older than --older-than")
    spools.add_argument("--older-than", type=float, default=7.0, metavar="DAYS",
                        help="with --clean, also remove orphaned spools with unwritten records this old "
                             "(default 7 days; 0 removes them all)")
    spools.add_argument("--root", default=None, help="where to look (default: XDG_RUNTIME_DIR or /dev/shm)")
    report = sub.add_parser("report", help="write one self-contained HTML page of a run from its full log")
    report.add_argument("directory")
    report.add_argument("--name", default="run")
    report.add_argument("-o", "--output", default=None, help="the page (default DIRECTORY/NAME.report.html)")
    args = parser.parse_args(argv)
    if args.command == "report":
        from ._report import report_command
        return report_command(args.directory, args.name, args.output)
    if args.command == "health":
        return health_command(args.directory, args.name, args.max_age)
    if args.command == "spools":
        return spools_command(args.clean, args.older_than, args.root)
    from ._demo import run_demo
    if args.workers < 1 or args.items < 1:
        parser.error("--workers and --items must be at least 1")
    return run_demo(args.dir, args.workers, args.items, args.start_method)


if __name__ == "__main__":
    sys.exit(main())
