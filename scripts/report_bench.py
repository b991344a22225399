"""Benchmark of ``python -m mplog report`` (issue 32): write a big full log directly in mplog's
full format, report it, print records/s, peak RSS, the page's size and its render time in
headless Chromium (if installed).

    PYTHONPATH=. python scripts/report_bench.py --records 10000000 [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

SEP = "-" * 72


def write_log(path: str, n: int, processes: int = 64, rate: float = 20000.0) -> float:
    """``n`` records of ``processes`` workers over n/rate seconds: 5 % warnings of a few templates,
    0.5 % errors (one in ten with a traceback), one SIGKILL death per 16 workers near the end."""
    t0 = 1.75e9
    stamps = {}
    out = []
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            t = t0 + i / rate
            sec = int(t)
            stamp = stamps.get(sec)
            if stamp is None:
                stamps.clear()
                stamp = stamps[sec] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec))
            pid = 1000 + i % processes
            head = f"[{stamp}.{int((t % 1) * 1000):03d}]"
            r = i % 200
            if r < 10:
                out.append(f"{head} [WARNING] [app.train] [ForkPoolWorker-{pid - 999}:{pid}] [train.py:88]\n"
                           f"  Message: loss={i / 7:.6f} at step {i}\n{SEP}\n")
            elif r == 10:
                tb = ("  Traceback (most recent call last):\n    File \"train.py\", line 12, in step\n"
                      f"  ValueError: bad batch {i}\n") if i % 2000 == 10 else ""
                out.append(f"{head} [ERROR] [app.io] [ForkPoolWorker-{pid - 999}:{pid}] [io.py:41]\n"
                           f"  Message: cannot read 'shard-{i % 97}.npz': errno {i % 5}\n{tb}{SEP}\n")
            else:
                out.append(f"{head} [INFO] [app.step] [ForkPoolWorker-{pid - 999}:{pid}] [train.py:70]\n"
                           f"  Message: step {i} done in {r / 1000:.3f} s\n{SEP}\n")
            if len(out) >= 10000:
                f.write("".join(out))
                out.clear()
        t = t0 + n / rate
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
        for k in range(0, processes, 16):
            pid = 1000 + k
            out.append(f"[{stamp}.000] [ERROR] [mplog] [ForkPoolWorker-{pid - 999}:{pid}] [<exit>:0]\n"
                       f"  Message: ForkPoolWorker-{pid - 999} (pid {pid}) was killed by SIGKILL after 1.00 s; the OOM "
                       f"killer is the usual sender; its last record was logged 0.10 s before\n"
                       f"  Context:\n    exit: SIGKILL(-9)\n{SEP}\n")
        out.append(f"[{stamp}.001] [INFO] [mplog] [mplog-listener:999] [loop.py:0]\n"
                   f"  Message: mplog stopped: {n} records written, 0 dropped, 0 lost\n{SEP}\n")
        f.write("".join(out))
    return n / rate


def render_ms(page: str) -> "float | None":
    """Load to loadEventEnd in headless Chromium, in ms; None without Chromium or Selenium."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None
    binary = shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        return None
    profile = tempfile.mkdtemp(prefix="mplog-bench-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        driver.get("file://" + os.path.abspath(page))
        return float(driver.execute_script(
            "var t = performance.timing; return t.loadEventEnd - t.navigationStart;"))
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=10_000_000)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    directory = args.dir or tempfile.mkdtemp(prefix="mplog-report-bench-")
    os.makedirs(directory, exist_ok=True)
    log = os.path.join(directory, "run.debug.log")
    t = time.perf_counter()
    write_log(log, args.records)
    print(f"wrote {args.records:,} records ({os.path.getsize(log) / 1e6:,.0f} MB) in {time.perf_counter() - t:.1f} s")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mplog", "report", directory], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(proc.stdout.strip(), proc.stderr.strip())
    page = os.path.join(directory, "run.report.html")
    print(f"report: {elapsed:.1f} s, {args.records / elapsed:,.0f} records/s, peak RSS {rss:,.0f} MB, "
          f"page {os.path.getsize(page) / 1e6:.2f} MB (exit {proc.returncode})")
    ms = render_ms(page)
    print("render in Chromium: " + (f"{ms:.0f} ms (navigationStart to loadEventEnd)" if ms is not None
                                      else "not measured (no chromium/chromedriver/selenium)"))
    if not args.keep and not args.dir:
        shutil.rmtree(directory)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
