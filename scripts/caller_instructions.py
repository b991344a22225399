#!/usr/bin/env python3
"""What one logging call costs its caller, in instructions, counted by valgrind's callgrind.

    python scripts/caller_instructions.py [--calls 5000]

Wall-clock timings on a shared machine move by tens of percent from one run to the next; the
instructions a call executes do not (the same count twice, whatever else the machine does). For
each handler (NullHandler: the floor, ``Logger.info`` itself; a FileHandler with the stdlib format
the benchmark uses; mplog's handler) the script runs one process under callgrind twice, with 0
and with ``--calls`` calls after the same warm-up, and prints the difference per call. Only the
calling process is counted: mplog's listener runs in a process of its own, and the kernel's side
of the FileHandler's ``write()`` is not counted either (so the FileHandler looks cheaper than it
is in seconds). Needs valgrind; takes about a minute a handler.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

CHILD = r"""
import logging, sys, tempfile
which, n = sys.argv[1], int(sys.argv[2])
log = logging.getLogger("bench")
root = logging.getLogger()
root.setLevel(logging.DEBUG)
for h in list(root.handlers):
    root.removeHandler(h)
d = tempfile.mkdtemp()
svc = None
if which == "null":
    h = logging.NullHandler()
elif which == "file":
    h = logging.FileHandler(d + "/f.log")
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"))
else:
    import mplog
    svc = mplog.LogService(d + "/logs", queue_size=1_000_000).start()
    h = [x for x in root.handlers if isinstance(x, mplog.SpoolHandler)][0]
    for x in list(root.handlers):
        root.removeHandler(x)
root.addHandler(h)
for i in range(1000):
    log.info("w%d processed item %d of %d: loss=%.6f", 1, i, 1000, i / 7)
for i in range(n):
    log.info("w%d processed item %d of %d: loss=%.6f", 1, i, n, i / 7)
if svc is not None:
    root.removeHandler(h)
    svc.flush(60)
    svc.stop()
"""


def instructions(python: str, which: str, calls: int, workdir: str) -> int:
    out = os.path.join(workdir, f"cg.{which}.{calls}.out")
    script = os.path.join(workdir, "child.py")
    with open(script, "w") as f:
        f.write(CHILD)
    subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", python, script, which,
                    str(calls)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no total in {out}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=5000)
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed", file=sys.stderr)
        return 2
    # The real interpreter, not a pyenv shim (a shell script valgrind would count instead).
    python = os.path.realpath(sys.executable)
    per_call = {}
    with tempfile.TemporaryDirectory() as workdir:
        for which in ("null", "file", "mplog"):
            base = instructions(python, which, 0, workdir)
            total = instructions(python, which, args.calls, workdir)
            per_call[which] = (total - base) / args.calls
            print(f"{which:6s} {per_call[which]:10,.0f} instructions per call", flush=True)
    floor = per_call["null"]
    ratio = (per_call["mplog"] - floor) / (per_call["file"] - floor)
    print(f"mplog's handler adds {per_call['mplog'] - floor:,.0f} instructions to Logger.info, a FileHandler "
          f"{per_call['file'] - floor:,.0f} (plus its write() in the kernel): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
