"""A LogService started and stopped many times in one process (a notebook, a test suite, a job
server) leaves the process as it found it: descriptors, mappings, threads, environment, spool
root (issue 29 item 4). RSS gets a bound, the rest zero growth per cycle.

The cycles run in a fresh interpreter, so pytest's own descriptors and threads do not blur the
figures, with ``XDG_RUNTIME_DIR`` a directory of the test's own: every entry in it is ours.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest

_SCRIPT = textwrap.dedent(r"""
    import json, logging, multiprocessing, os, sys, threading, warnings
    import mplog

    warnings.filterwarnings("ignore", category=DeprecationWarning)  # fork() with threads, 3.12+
    root = os.environ["XDG_RUNTIME_DIR"]

    def snapshot():
        fds = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                pass  # listdir's own descriptor, closed since
        with open("/proc/self/maps") as f:
            maps = [line.split(None, 5)[-1].strip() for line in f if "mplog" in line or root in line]
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return {"fds": fds, "maps": maps, "threads": sorted(t.name for t in threading.enumerate()),
                "env": {k: v for k, v in os.environ.items() if k == "PYTHONPATH" or k.startswith("MPLOG")},
                "spool_root": sorted(os.listdir(root)), "rss": rss}

    def child(config):
        mplog.worker_init(config)
        logging.getLogger("child").info("from a child")

    if __name__ == "__main__":  # a spawn child imports this file too
        directory, warm, cycles, method = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
        ctx = multiprocessing.get_context(method) if method != "none" else None
        before = None
        for i in range(warm + cycles):
            if i == warm:
                before = snapshot()
            svc = mplog.LogService(directory, "run").start()
            logging.getLogger("app").info("cycle %d", i)
            if ctx is not None:
                p = ctx.Process(target=child, args=(svc.worker_config,))
                p.start()
                p.join(60)
                p.close()  # its sentinel pipes are the test's, not mplog's
            svc.stop()
        print(json.dumps({"before": before, "after": snapshot()}))
""")


def _cycle(tmp_path, warm: int, cycles: int, method: str) -> dict:
    runtime = tempfile.mkdtemp(prefix="cycles-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        env = dict(os.environ, XDG_RUNTIME_DIR=runtime)
        script = tmp_path / "cycles.py"
        script.write_text(_SCRIPT)
        out = subprocess.run([sys.executable, str(script), str(tmp_path), str(warm), str(cycles), method],
                             env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        leftovers = os.listdir(runtime)
    finally:
        subprocess.run(["rm", "-rf", runtime])
    result["leftovers"] = leftovers
    return result


def _assert_as_before(result: dict, cycles: int) -> None:
    before, after = result["before"], result["after"]
    new_fds = sorted(target for fd, target in after["fds"].items() if before["fds"].get(fd) != target)
    assert not new_fds, f"{len(new_fds)} descriptors left by {cycles} cycles: {new_fds[:8]}"
    assert len(after["fds"]) == len(before["fds"])
    assert after["maps"] == before["maps"], f"mappings left: {sorted(set(after['maps']) - set(before['maps']))}"
    assert after["threads"] == before["threads"]
    assert after["env"] == before["env"]
    assert after["spool_root"] == before["spool_root"] == [], after["spool_root"]
    assert result["leftovers"] == []
    # A bound, not zero: the allocator keeps what it got back (warm-up takes most of it).
    assert after["rss"] - before["rss"] < 5 * 2 ** 20, (before["rss"], after["rss"])


def test_cycles_leave_the_process_as_it_was(tmp_path):
    """30 start/log/stop cycles, after 5 of warm-up: zero growth of fds, maps, threads, env, spool."""
    result = _cycle(tmp_path, 5, 30, "none")
    _assert_as_before(result, 30)
    assert (tmp_path / "run.debug.log").read_text().count("cycle ") == 35


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_cycles_with_a_worker_leave_the_process_as_it_was(tmp_path, method):
    """Each cycle also runs a worker of ``method``: its records arrive, and nothing is left."""
    result = _cycle(tmp_path, 3, 10, method)
    _assert_as_before(result, 10)
    text = (tmp_path / "run.debug.log").read_text()
    assert text.count("cycle ") == 13
    assert text.count("from a child") == 13
