"""Shared machines (issue 29, items 2, 3 and 5): what other users can do to a service.

* Only directories and files that mplog made, and that no one else can write: a capture
  directory made in advance by another user, at the name mplog used to choose, is not used,
  and no code of that user runs in the service's processes.
* A file set is known by what it is: two services on different files at the same path in two
  mount namespaces both start; the same files through a symlink or a bind mount are one file
  set; another user cannot hold a file set's lock.
* Silent in every other interpreter: Python 2.7 and 3.6 started with the service's environment
  print nothing and run the user's own sitecustomize.

The tests that need another user run as root (``os.chown``, ``setpriv``) and are skipped
otherwise; those that need a mount namespace are skipped where ``unshare -m`` is not allowed.
"""

from __future__ import annotations

import glob
import json
import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

import mplog
import workers
from conftest import app_blocks, read_blocks

pytestmark = pytest.mark.timeout(180)

NOBODY = 65534
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="making files of another user needs root (os.chown)")


def _can_unshare() -> str:
    """'' if ``unshare -m`` with a tmpfs mount works here, else why not."""
    if os.geteuid() != 0:
        return "unshare -m and mount need root"
    if shutil.which("unshare") is None:
        return "no unshare(1) here"
    try:
        r = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt && umount /mnt"],
                           capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare -m failed: {exc}"
    return "" if r.returncode == 0 else f"unshare -m is not allowed here: {r.stderr.decode(errors='replace').strip()}"


UNSHARE = _can_unshare()
needs_unshare = pytest.mark.skipif(bool(UNSHARE), reason=UNSHARE or "-")


# -- item 2: only what mplog made -----------------------------------------------------------------
def _plant(path: str, marker: str) -> None:
    """A directory of uid 65534, mode 0777, with a ``sitecustomize/`` package and a ``json.py``
    that leave ``marker`` (with the pid that ran them) if anything imports them."""
    code = (f"import os\nwith open({marker!r}, 'a') as f:\n"
            f"    f.write('%d %s\\n' % (os.getpid(), __name__))\n")
    os.mkdir(path)
    os.makedirs(os.path.join(path, "sitecustomize"))
    for name in ("sitecustomize/__init__.py", "json.py", "config.json"):
        with open(os.path.join(path, name), "w") as f:
            f.write(code if name.endswith(".py") else "{}")
    for dirpath, dirnames, filenames in os.walk(path):
        for n in [dirpath] + [os.path.join(dirpath, x) for x in filenames]:
            os.chown(n, NOBODY, NOBODY)
            os.chmod(n, 0o777)


def _old_capture_names() -> List[str]:
    """Where mplog up to 3b35e68 put this process's capture directory: a name anyone can
    compute from /proc (the uid, the pid, its start time)."""
    from mplog._common.spool import _process_start, spool_root
    roots = {spool_root(), "/dev/shm", "/tmp"}
    if os.environ.get("XDG_RUNTIME_DIR"):
        roots.add(os.environ["XDG_RUNTIME_DIR"])
    name = f"mplog-children-{os.getuid()}-{os.getpid()}-{_process_start(os.getpid())}"
    return [os.path.join(r, name) for r in sorted(roots) if os.path.isdir(r)]


@pytest.fixture
def planted(tmp_path: Path) -> Iterator[Dict[str, object]]:
    marker = tmp_path / "marker"
    made = []
    for path in _old_capture_names():
        if os.path.lexists(path):
            pytest.skip(f"{path} exists already (not made by this test)")
        _plant(path, str(marker))
        made.append(path)
    yield {"marker": marker, "paths": made}
    for path in made:  # only what this test made
        shutil.rmtree(path, ignore_errors=True)


def _contents(path: str) -> Dict[str, object]:
    out: Dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames + filenames:
            full = os.path.join(dirpath, n)
            st = os.lstat(full)
            out[os.path.relpath(full, path)] = (st.st_uid, stat.S_IMODE(st.st_mode))
    return out


@needs_root
def test_a_capture_directory_planted_by_another_user_is_not_used(planted, tmp_path, ctx):
    """The old capture directory names, made first by uid 65534 (mode 0777, a ``sitecustomize/``
    package and a ``json.py`` that leave a marker): the service makes its own, no code of that
    uid runs in a pool worker (made without the initializer), in a plain child interpreter or
    anywhere, the planted directories are left as they were, and every record arrives."""
    before = {p: _contents(p) for p in planted["paths"]}
    with mplog.LogService(tmp_path / "logs", shutdown_timeout=10.0) as svc:
        here = os.environ["MPLOG_CAPTURE"].partition(":")[2]
        assert here not in planted["paths"]
        st = os.lstat(here)
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700
        # Nothing but sitecustomize can be imported from the directory on PYTHONPATH.
        importable = [n for n in os.listdir(here) if os.path.isdir(os.path.join(here, n)) and n.isidentifier()
                      or os.path.isfile(os.path.join(here, n)) and n.endswith((".py", ".pyc", ".so"))]
        assert importable == ["sitecustomize.py"], os.listdir(here)
        spool = svc._run.spool.path
        st = os.lstat(spool)
        assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700
        tags = [f"planted-{ctx.get_start_method()}-{i}" for i in range(4)]
        with ctx.Pool(2) as pool:  # no initializer: the capture has to do it
            pids = dict(zip(tags, pool.map(workers.log_tagged, tags)))
        child = subprocess.run([sys.executable, "-c", "import json, sitecustomize; print(json.dumps([1]))"],
                               capture_output=True, text=True, timeout=60)
        assert (child.returncode, child.stdout, child.stderr) == (0, "[1]\n", "")
        assert svc.flush(30)
        got = {str(b["message"])[len("capture "):]: b["pid"] for b in app_blocks(svc.full_path)
               if str(b["message"]).startswith("capture ")}
    assert got == pids
    assert not planted["marker"].exists(), planted["marker"].read_text()
    assert {p: _contents(p) for p in planted["paths"]} == before
    print(f"\nFIGURE planted={len(planted['paths'])} dirs, records={len(got)}/{len(tags)}, marker absent")


ROOTS = {
    # mode, owner, used: a root another user can rename our spool out of is passed over
    "others-write-no-sticky": (0o777, None, False),
    "others-write-sticky": (0o1777, None, True),
    "another-users": (0o755, 65534, False),
}


@pytest.mark.parametrize("kind", list(ROOTS))
def test_a_spool_root_another_user_could_rename_in_is_not_used(tmp_path, monkeypatch, ctx, kind):
    """XDG_RUNTIME_DIR pointing at a directory others can write without the sticky bit, or at
    one of another uid: the spool and the capture directory go elsewhere, a notice names the
    root and why, the directory is left empty, and every record of a pool worker (made without
    the initializer, so the capture has to do it) arrives. With the sticky bit it is used."""
    mode, owner, used = ROOTS[kind]
    root = tmp_path / "runtime"
    root.mkdir()
    os.chmod(root, mode)
    if owner is not None:
        if os.geteuid() != 0:
            pytest.skip("needs root to give the directory to another uid")
        os.chown(root, owner, owner)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(root))
    tags = [f"root-{kind}-{ctx.get_start_method()}-{i}" for i in range(4)]
    with mplog.LogService(tmp_path / "logs", shutdown_timeout=10.0) as svc:
        spool = svc.health()["queue"]["spool"]
        capture = os.environ["MPLOG_CAPTURE"].partition(":")[2]
        with ctx.Pool(2) as pool:
            pids = dict(zip(tags, pool.map(workers.log_tagged, tags)))
        inside = os.listdir(root)
        assert svc.flush(30)
    blocks = read_blocks(tmp_path / "logs" / "run.debug.log")
    notices = [str(b["message"]) for b in blocks if b["logger"] == "mplog"]
    got = {str(b["message"])[len("capture "):]: b["pid"] for b in blocks if str(b["message"]).startswith("capture ")}
    assert got == pids
    assert (spool.startswith(str(root) + os.sep), capture.startswith(str(root) + os.sep)) == (used, used)
    refused = [m for m in notices if f"{root} is not used" in m]
    if used:
        assert refused == [] and inside, (notices, inside)
    else:
        why = "no sticky bit" if owner is None else f"belongs to uid {owner}"
        assert inside == [] and len(refused) == 1 and why in refused[0], (notices, inside)
    print(f"\nFIGURE {kind}: spool {spool}, records {len(got)}/{len(tags)}, notice {refused}")


@needs_root
def test_a_capture_name_retaken_by_another_user_between_services_is_not_used(tmp_path):
    """A process's capture directory keeps its name from one service to the next (a worker that
    outlived a service follows the next there). If another user takes that name while no
    service runs, the next service makes a new directory instead, and a worker of the first
    service reads no config.json of that user."""
    with mplog.LogService(tmp_path / "one", shutdown_timeout=10.0):
        first = os.environ["MPLOG_CAPTURE"].partition(":")[2]
    assert not os.path.exists(first)
    marker = tmp_path / "marker"
    _plant(first, str(marker))
    try:
        with mplog.LogService(tmp_path / "two", shutdown_timeout=10.0) as svc:
            second = os.environ["MPLOG_CAPTURE"].partition(":")[2]
            assert second != first and os.lstat(second).st_uid == os.getuid()
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                pids = pool.map(workers.log_tagged, ["retaken"])
            assert svc.flush(30)
            assert [b["pid"] for b in app_blocks(svc.full_path)] == pids
        from mplog._app import capture as _capture
        assert _capture._read_config(first) is None  # what a worker that outlived a service would read
        assert not marker.exists()
    finally:
        shutil.rmtree(first, ignore_errors=True)


@needs_root
def test_stale_capture_directories_of_another_user_are_not_removed(tmp_path):
    """Cleaning the capture directories of dead processes removes only this user's: another
    user's directory with a name of ours (a dead pid) is left alone."""
    from mplog._common.spool import spool_root
    fake = os.path.join(spool_root(), f"mplog-children-{os.getuid()}-999999999-1-abcdefgh")
    _plant(fake, str(tmp_path / "marker"))
    try:
        with mplog.LogService(tmp_path / "logs", shutdown_timeout=10.0):
            pass
        assert os.path.isdir(fake) and os.lstat(fake).st_uid == NOBODY
    finally:
        shutil.rmtree(fake, ignore_errors=True)


# -- item 3: a file set is what it is ---------------------------------------------------------------
_PROGRAM = """\
import faulthandler, multiprocessing, os, sys
import mplog, workers


def main():
    faulthandler.dump_traceback_later(60, exit=True)
    directory, method, hold = sys.argv[1], sys.argv[2], sys.argv[3] == "hold"
    try:
        svc = mplog.LogService(directory, shutdown_timeout=10.0).start()
    except OSError as exc:
        print("refused", exc, flush=True)
        sys.exit(3)
    with multiprocessing.get_context(method).Pool(1, **svc.pool_kwargs()) as pool:
        pool.map(workers.log_tagged, ["ns-%d" % os.getpid()])
    assert svc.flush(30)
    print("started", os.getpid(), os.stat(directory).st_dev, flush=True)
    if hold:
        sys.stdin.readline()
    svc.stop()
    text = open(os.path.join(directory, "run.debug.log")).read()
    print("records", text.count("capture ns-"), text.count("capture ns-%d" % os.getpid()), flush=True)


if __name__ == "__main__":
    main()
"""


def _program(tmp_path: Path) -> str:
    path = tmp_path / "program.py"
    path.write_text(_PROGRAM)
    return str(path)


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, TESTS] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _in_namespace(setup: str, argv: List[str]) -> List[str]:
    """A command run in a mount namespace of its own, after the shell commands ``setup``."""
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", f'{setup} && exec "$@"', "sh"] + argv


@needs_unshare
def test_two_mount_namespaces_with_different_files_at_one_path_both_start(tmp_path, ctx):
    """Two programs, each in a mount namespace with its own tmpfs at the same path (two
    containers on the host's network), log to ``<path>/run.log``: both start, and each file
    holds its own program's records only."""
    where = tmp_path / "shared-path"
    where.mkdir()
    method = ctx.get_start_method()
    mount = f"mount -t tmpfs -o size=8m tmpfs {where}"
    argv = [sys.executable, _program(tmp_path), str(where), method]
    first = subprocess.Popen(_in_namespace(mount, argv + ["hold"]), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=_env())
    try:
        line = first.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("started"), line + first.stderr.read()  # type: ignore[union-attr]
        second = subprocess.run(_in_namespace(mount, argv + ["once"]), capture_output=True, text=True,
                                timeout=120, env=_env())
        assert second.returncode == 0, second.stdout + second.stderr
        out2 = second.stdout.split("\n")
        out1, err1 = first.communicate("\n", timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
    assert first.returncode == 0, out1 + err1
    dev1, dev2 = line.split()[2], out2[0].split()[2]
    assert dev1 != dev2  # two filesystems at one path
    for line_ in (out1.split("\n")[0], out2[1]):  # "records <all> <this program's>"
        _, total, own = line_.split()
        assert total == own and int(own) >= 1, line_
    assert not os.listdir(where)  # the tmpfs were the namespaces' own
    print(f"\nFIGURE both started: st_dev {dev1} and {dev2}; each file 1 record, its own")


@needs_unshare
@pytest.mark.parametrize("how", ["symlink", "bind mount"])
def test_one_directory_through_two_paths_is_one_file_set(tmp_path, how):
    """The same files through a symbolic link or a bind mount (another process, another mount
    namespace): the second service is refused, naming the files and the holder's pid."""
    logs = tmp_path / "logs"
    other = tmp_path / "other"
    if how == "symlink":
        other.symlink_to(logs, target_is_directory=True)
        setup = "true"
    else:
        other.mkdir()
        setup = f"mount --bind {logs} {other}"
    argv = [sys.executable, _program(tmp_path), str(other), "spawn", "once"]
    with mplog.LogService(logs, shutdown_timeout=10.0):
        r = subprocess.run(_in_namespace(setup, argv), capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.stdout.startswith("refused") and "[Errno 16]" in r.stdout
    assert f"pid {os.getpid()}" in r.stdout and str(other / "run.log") in r.stdout
    print(f"\nFIGURE {how}: {r.stdout.strip()}")


def test_one_directory_through_a_symlink_in_this_process_is_one_file_set(tmp_path):
    """In one process too: a second service through another path is refused."""
    logs = tmp_path / "logs"
    with mplog.LogService(logs, shutdown_timeout=10.0):
        (tmp_path / "link").symlink_to(logs, target_is_directory=True)
        with pytest.raises(OSError, match="another mplog service") as info:
            mplog.LogService(tmp_path / "link", shutdown_timeout=10.0).start()
        assert f"pid {os.getpid()}" in str(info.value)


_THIEF = textwrap.dedent("""
    # uid 65534 tries every way it has to take the lock of a file set of root's, then holds what it got.
    import fcntl, os, socket, sys
    directory, name = sys.argv[2], "run"
    got = []
    for prefix in [sys.argv[1]]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            s.bind("\\0" + prefix + "lock")  # the lock of mplog up to 3b35e68
            got.append("abstract socket")
        except OSError:
            s.close()
    for path in [os.path.join(directory, n) for n in os.listdir(directory)] + [
            os.path.join(directory, ".%s.lock" % name), os.path.join(directory, "%s.lock" % name)]:
        for flags in (os.O_RDONLY, os.O_RDWR | os.O_CREAT):
            try:
                fd = os.open(path, flags, 0o666)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                got.append("flock " + path)
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                got.append("lockf " + path)
            except OSError:
                pass
    print("holding", got, flush=True)
    sys.stdin.readline()
""")


@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="no setpriv(1) to run a process as uid 65534")
@pytest.mark.parametrize("leftover", [False, True], ids=["fresh", "after-a-crash"])
def test_another_user_cannot_hold_the_lock_of_a_file_set(tmp_path, leftover):
    """uid 65534, who can read the log directory, binds the old lock's abstract name and opens
    and locks everything it can there (with ``leftover``, what a SIGKILLed service left): the
    service still starts."""
    import tempfile
    from mplog._common.spool import spool_prefix
    public = tempfile.mkdtemp(prefix="mplog-test-thief-")  # /tmp: uid 65534 can reach it
    os.chmod(public, 0o755)
    logs = Path(public) / "logs"
    logs.mkdir()
    os.chmod(logs, 0o755)
    try:
        _thief_cannot_hold(logs, leftover, spool_prefix(str(logs), "run"))
    finally:
        shutil.rmtree(public, ignore_errors=True)


def _thief_cannot_hold(logs: Path, leftover: bool, old_prefix: str) -> None:
    if leftover:
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            import os, mplog
            mplog.LogService({str(logs)!r}).start()
            os.kill(os.getpid(), 9)""")], capture_output=True, timeout=60, env=_env())
        assert r.returncode == -9
    thief = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                              sys.executable, "-c", _THIEF, old_prefix, str(logs)], cwd="/",
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = thief.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("holding"), line + thief.stderr.read()  # type: ignore[union-attr]
        with mplog.LogService(logs, shutdown_timeout=10.0) as svc:
            assert svc.health()["status"] in ("healthy", "starting")
    finally:
        thief.communicate("\n", timeout=30)
    _wait_listeners_gone(str(logs))
    print(f"\nFIGURE leftover={leftover}: uid 65534 got {line.strip()[len('holding '):]}; the service started")


def _wait_listeners_gone(directory: str) -> None:
    import psutil
    from conftest import wait_for

    def gone() -> bool:
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if "mplog._listener" in cmd and any(directory in c for c in cmd):
                return False
        return True
    wait_for(gone, timeout=30, what="the crashed run's listener to exit")


def test_a_lock_file_of_another_user_is_refused_with_its_owner(tmp_path):
    """A lock file that another user owns (planted in a directory others can write) could be
    held by that user: the service refuses it, naming the file and its owner."""
    if os.geteuid() != 0:
        pytest.skip("making a file of another user needs root (os.chown)")
    logs = tmp_path / "logs"
    logs.mkdir()
    os.chmod(logs, 0o1777)
    lock = logs / ".run.lock"
    lock.write_text("")
    os.chown(lock, NOBODY, NOBODY)
    with pytest.raises(OSError, match="uid 65534") as info:
        mplog.LogService(logs).start()
    assert str(lock) in str(info.value)
    assert lock.exists() and lock.stat().st_uid == NOBODY  # not ours to remove


def test_the_lock_file_is_private_and_goes_with_the_service(tmp_path):
    """The lock file is 0600, holds the holder's pid, and is removed by stop()."""
    logs = tmp_path / "logs"
    with mplog.LogService(logs, shutdown_timeout=10.0):
        st = os.lstat(logs / ".run.lock")
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
        assert (logs / ".run.lock").read_text().split()[0] == str(os.getpid())
    assert not (logs / ".run.lock").exists()


def test_a_forked_child_that_outlives_its_service_does_not_keep_the_next_out(tmp_path):
    """A forked worker inherits the lock's descriptor and closes it: when the service stops
    while the worker lives on (an orphan), the next service on the same files starts."""
    import signal
    logs = tmp_path / "logs"
    ctx = multiprocessing.get_context("fork")
    with mplog.LogService(logs, shutdown_timeout=10.0) as svc:
        ready, stay = ctx.Event(), ctx.Event()
        child = ctx.Process(target=workers.hold_until, args=(svc.worker_config, ready, stay))
        child.start()
        assert ready.wait(60)
    try:
        with mplog.LogService(logs, shutdown_timeout=10.0) as again:
            assert again.health()["status"] in ("healthy", "starting")
    finally:
        stay.set()
        child.join(30)
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
            child.join(10)


# -- item 5: silent elsewhere ---------------------------------------------------------------------
def _pythons() -> List[str]:
    found = []
    for pattern in ("2.7*", "3.6*", "3.7*", "3.8*", "3.9*", "3.1[0-9]*"):
        found += sorted(glob.glob(f"/root/.pyenv/versions/{pattern}/bin/python"))
    return found


OLD = [p for p in _pythons() if "/2.7" in p or "/3.6" in p]


@pytest.mark.skipif(len(OLD) < 2, reason="needs pyenv's Python 2.7 and 3.6 under /root/.pyenv/versions")
def test_other_interpreters_started_while_a_service_runs_are_silent(tmp_path):
    """Every interpreter pyenv has (2.7, 3.6 and the rest), started with the service's
    environment: exit 0, nothing on stdout or stderr, and the user's own sitecustomize (on
    PYTHONPATH before the service started) still runs, once."""
    own = tmp_path / "own"
    own.mkdir()
    (own / "sitecustomize.py").write_text("import os\nos.environ['OWN_SITE'] = os.environ.get('OWN_SITE', '') + 'x'\n")
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(own) + (os.pathsep + saved if saved else "")
    results = {}
    try:
        with mplog.LogService(tmp_path / "logs", shutdown_timeout=10.0):
            here = os.environ["MPLOG_CAPTURE"].partition(":")[2]
            for python in _pythons():
                for code in ("pass", "import os, sys; sys.stdout.write(os.environ.get('OWN_SITE', '-'))"):
                    r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
                    results[(python, code[:4])] = (r.returncode, r.stdout, r.stderr)
            left = sorted(os.listdir(here))
            blockers = (os.path.isfile(os.path.join(here, "__pycache__")), os.listdir(os.path.join(here, "sitecustomize.pyc")))
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    bad = {k: v for k, v in results.items() if v != (0, "" if k[1] == "pass" else "x", "")}
    assert not bad, bad
    # No interpreter wrote bytecode into the directory on PYTHONPATH.
    assert sorted(left) == ["__pycache__", "config.json", "sitecustomize.py", "sitecustomize.pyc"], left
    assert blockers == (True, [])
    print(f"\nFIGURE {len(results)} runs of {len(_pythons())} interpreters silent, own sitecustomize ran once; "
          f"directory holds {left}")


def test_the_capture_sitecustomize_compiles_as_python_2_and_3_6(tmp_path):
    """The file itself parses in Python 2.7 and 3.6 (skipped for those not installed)."""
    pythons = OLD
    if not pythons:
        pytest.skip("no pyenv Python 2.7 or 3.6 under /root/.pyenv/versions")
    with mplog.LogService(tmp_path / "logs", shutdown_timeout=10.0):
        here = os.environ["MPLOG_CAPTURE"].partition(":")[2]
        source = open(os.path.join(here, "sitecustomize.py")).read()
    for python in pythons:
        r = subprocess.run([python, "-c", "import sys; compile(sys.stdin.read(), 'sitecustomize.py', 'exec')"],
                           input=source, capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stderr) == (0, ""), (python, r.stderr)
