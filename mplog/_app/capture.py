"""Children that log to the service with no code of their own (issue 13).

Most pools in scientific code are made by a library (joblib's loky workers, Dask's processes
scheduler) or by old code, without mplog's initializer. While a ``LogService`` runs with
``capture_children=True`` (the default), its main process publishes the service, and each pool
worker it starts installs mplog by itself, before any user code runs::

    main process (LogService.start → publish)
      ├─ a directory <spool root>/mplog-children-<uid>-<pid>-<start>-<random>/, 0700, made
      │  by mkdir (never one that exists: see docs/shared-machines.md):
      │     config.json       the WorkerConfig of the service children should log to
      │     sitecustomize.py  runs first thing in every new interpreter that inherits ...
      │                       (Python 2 syntax; the only importable name in the directory)
      ├─ ... the environment: MPLOG_CAPTURE=<pid>:<dir>, and <dir> first on PYTHONPATH
      │     → spawn children and loky workers (new interpreters): sitecustomize chains to any
      │       sitecustomize of your own, then installs mplog from config.json
      └─ multiprocessing.spawn.get_preparation_data, wrapped: the preparation data a spawn or
            forkserver child unpickles before anything else carries the config
            → forkserver children (forked from a server that may predate the service, with an
              older environment) get the service current when the process was made

A captured process does the same for its own children (nested pools). Only pool workers are
captured: a ``spawn_main`` child or a loky worker whose parent is the process named in
``MPLOG_CAPTURE``; any other interpreter (``subprocess.run([sys.executable, ...])``, another
program, the forkserver and resource-tracker processes) runs the chained sitecustomize and
nothing else. ``stop()`` withdraws everything: the directory, the variables, the wrapper.

Workers outlive services (loky's reusable executor keeps its workers for the next call). A
captured worker whose service has stopped logs as if mplog were not there (``lastResort``), and
follows the next service its main process publishes: ``config.json`` is looked up again, one
``stat`` a record, only in that state.

Standard library only: this module runs in every captured worker.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
from typing import Any, Dict, List, Optional, Tuple

from .._common.worker_config import WorkerConfig
from .handler import SpoolHandler, install, uninstall
from . import handler as _worker

__all__ = ["ENV", "OFF_ENV", "CapturedHandler", "adopt", "boot", "capture_dir", "clean_environ", "disabled_by_env",
           "is_captured", "publish", "release", "resume", "withdraw"]

ENV = "MPLOG_CAPTURE"  # "<pid of the process whose children are captured>:<capture directory>"
OFF_ENV = "MPLOG_CAPTURE_CHILDREN"  # "0" (or false/no/off) turns capture off
_PREP_KEY = "mplog_capture"
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # mplog/, above _app/


def disabled_by_env(environ: Any = None) -> bool:
    """True when ``MPLOG_CAPTURE_CHILDREN`` says no (``0``, ``false``, ``no``, ``off``)."""
    value = (os.environ if environ is None else environ).get(OFF_ENV, "")
    return value.strip().lower() in ("0", "false", "no", "off")


# -- code that runs in a child before mplog is imported ---------------------------------------
# Load this very copy of mplog (the parent's), whatever the child's sys.path holds: a worker
# must speak the same wire format as its listener.
_LOAD_MPLOG = '''
def _mplog_import(package):
    import importlib.util, sys
    if "mplog" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "mplog", package + "/__init__.py", submodule_search_locations=[package])
        module = importlib.util.module_from_spec(spec)
        sys.modules["mplog"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules["mplog"]
            raise
    from mplog._app import capture as _capture
    return _capture


def _mplog_say(exc):
    import os, sys
    try:
        sys.stderr.write("mplog: process %d could not join the log service: %s: %s\\n"
                         % (os.getpid(), type(exc).__name__, exc))
    except Exception:
        pass
'''

_SITECUSTOMIZE = '''\
# Written by mplog for the pool workers of process {pid} while its LogService runs, and removed
# when the service stops (see mplog/_app/capture.py). Chains to the sitecustomize that would have
# run without this directory on PYTHONPATH. Every interpreter that inherits the environment
# imports this file (Python 2.7 and 3.6 too): it is Python 2 syntax, and it does nothing but
# the chain outside a pool worker of a Python mplog runs on.
import os as _os
import sys as _sys
{loader}

def _mplog_is_pool_worker(here):
    if _sys.version_info < (3, 9):
        return False  # mplog's Pythons only: no other interpreter is a pool worker of the service
    value = _os.environ.get("{env}", "")
    pid, _, where = value.partition(":")
    if where != here or not pid.isdigit() or int(pid) != _os.getppid():
        return False  # not a child of the capturing process: another program's, or a grandchild
    if _os.environ.get("{off}", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    argv = getattr(_sys, "orig_argv", None)
    if argv is None:  # before 3.10
        with open("/proc/self/cmdline", "rb") as f:
            argv = [a.decode("utf-8", "surrogateescape") for a in f.read().split(b"\\0")]
    for flag, value in zip(argv, argv[1:]):
        if flag == "-c" and value.lstrip().startswith("from multiprocessing.spawn import spawn_main"):
            return True
        if flag == "-m" and value.endswith("loky.backend.popen_loky_posix"):
            return True
    return False


def _mplog_capture(here={here!r}, package={package!r}):
    _sys.path[:] = [p for p in _sys.path if p != here]
    try:
        if _mplog_is_pool_worker(here):
            _mplog_import(package).boot(here)
    except Exception as exc:
        _mplog_say(exc)


_mplog_capture()
del _mplog_capture, _mplog_is_pool_worker, _mplog_import, _mplog_say
# The next sitecustomize on sys.path, now that this directory left it. The import system takes
# this module back out of sys.modules when it is done: leave one there, ours if none other.
_mplog_self = _sys.modules.pop("sitecustomize", None)
try:
    import sitecustomize  # noqa: F401
except ImportError as _exc:
    _sys.modules.setdefault("sitecustomize", _mplog_self)
    if getattr(_exc, "name", "sitecustomize") != "sitecustomize":  # Python 2: no name (and site ignores it)
        raise
except BaseException:
    _sys.modules.setdefault("sitecustomize", _mplog_self)
    raise
'''

_CARRIED = _LOAD_MPLOG + '''
try:
    _mplog_import(_mplog_capture[1]).adopt(_mplog_capture[0], _mplog_capture[2])
except Exception as exc:
    _mplog_say(exc)
'''


class _Carried:
    """The service, carried in a spawn or forkserver child's preparation data: unpickling it in
    the child (before ``prepare()``, before ``__main__``) installs mplog there. It unpickles to
    None, with nothing but builtins, so a child without mplog still starts."""

    def __init__(self, here: str, config_json: str) -> None:
        self.args = (here, _PACKAGE, config_json)

    def __reduce__(self) -> Tuple[Any, ...]:
        return (exec, (_CARRIED, {"_mplog_capture": self.args}))


# -- this process's capture state (one per process) -------------------------------------------
class _State:
    def __init__(self) -> None:
        self.here: Optional[str] = None  # the capture directory this process's children use
        self.published: List[WorkerConfig] = []  # main process: the services, latest last
        self.saved_pythonpath: Optional[str] = None  # PYTHONPATH before the first publish
        self.our_pythonpath: Optional[str] = None  # and as publish() set it
        self.suspended: Optional[CapturedHandler] = None  # release() by an explicit route
        self.original_gpd: Any = None
        self.pending: Optional[Tuple[str, WorkerConfig]] = None  # to install at _bootstrap
        self.made: Optional[Tuple[int, str]] = None  # (pid, the capture directory it made)


_state = _State()


def capture_dir() -> str:
    """This process's capture directory, made if need be: the same for each of its services
    (made again at the same name after a stop), so a worker that outlived one service finds
    the next. Its name ends in random characters and it is made with ``mkdir`` (never an
    existing directory): another user who made a directory at a name of ours first, in a
    world-writable root, is never used. Raises OSError."""
    import tempfile
    from .._common.spool import _process_start, spool_root
    pid = os.getpid()
    root = os.path.abspath(spool_root())
    made = _state.made
    # The same name only in the same root: a process whose spool root changed (another
    # XDG_RUNTIME_DIR) captures, and cleans the stale captures of dead runs, in the new one.
    if made is not None and made[0] == pid and os.path.dirname(made[1]) == root:
        path = made[1]
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        if _is_ours(path):
            return path
    path = tempfile.mkdtemp(prefix=f"mplog-children-{os.getuid()}-{pid}-{_process_start(pid)}-", dir=root)
    if not _is_ours(path):
        raise PermissionError(errno.EPERM, "the capture directory was changed by someone else", path)
    _state.made = (pid, path)
    return path


def _is_ours(path: str) -> bool:
    """A directory (not a link) of this user that nobody else can write, with nothing in it
    that another user made."""
    try:
        st = os.lstat(path)
        if not (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077):
            return False
        return all(e.stat(follow_symlinks=False).st_uid == os.getuid() for e in os.scandir(path))
    except OSError:
        return False


def _read_config(here: str) -> Optional[WorkerConfig]:
    """The capture directory's config.json if this user wrote it (a directory another user
    made at the name, after our service stopped, is never read), else None."""
    try:
        fd = os.open(os.path.join(here, "config.json"), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd) as f:
        st = os.fstat(fd)
        if st.st_uid != os.getuid() or st.st_mode & 0o022 or not _is_ours(here):
            return None
        try:
            return WorkerConfig.from_json(f.read())
        except (OSError, ValueError, TypeError):
            return None


def _current_config() -> Optional[WorkerConfig]:
    """The service this process's children should log to."""
    if _state.published:
        return _state.published[-1]
    handler = _worker._installed
    if _state.here is not None and handler is not None and not handler.channel.stopped():
        return handler.config
    return None


def _get_preparation_data(name: str, *args: Any, **kwargs: Any) -> Dict[str, Any]:
    data = _state.original_gpd(name, *args, **kwargs)
    cfg = _current_config()
    if cfg is not None and _state.here is not None:
        data[_PREP_KEY] = _Carried(_state.here, cfg.to_json())
    return data


def _hook_multiprocessing() -> None:
    import multiprocessing.spawn as spawn
    if spawn.get_preparation_data is not _get_preparation_data:
        _state.original_gpd = spawn.get_preparation_data
        spawn.get_preparation_data = _get_preparation_data  # type: ignore[assignment]


def _unhook_multiprocessing() -> None:
    spawn = sys.modules.get("multiprocessing.spawn")
    if spawn is not None and spawn.get_preparation_data is _get_preparation_data:
        spawn.get_preparation_data = _state.original_gpd  # type: ignore[attr-defined]


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"  # not importable: only sitecustomize is
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# -- the main process -------------------------------------------------------------------------
def publish(config: WorkerConfig) -> str:
    """Capture the pool workers this process starts from now on into ``config``'s service.
    Returns the capture directory. Raises OSError if it cannot be written."""
    here = capture_dir()
    _clean_stale(os.path.dirname(here))
    _block_bytecode(here)
    _write_atomic(os.path.join(here, "sitecustomize.py"), _SITECUSTOMIZE.format(
        pid=os.getpid(), env=ENV, off=OFF_ENV, here=here, package=_PACKAGE, loader=_LOAD_MPLOG))
    _write_atomic(os.path.join(here, "config.json"), config.to_json())
    if not _state.published:
        old = _state.saved_pythonpath = os.environ.get("PYTHONPATH")
        _state.our_pythonpath = here + (os.pathsep + old if old else "")
        os.environ["PYTHONPATH"] = _state.our_pythonpath
        os.environ[ENV] = f"{os.getpid()}:{here}"
    _state.published.append(config)
    _state.here = here
    _hook_multiprocessing()
    return here


def _block_bytecode(here: str) -> None:
    # The directory on PYTHONPATH holds sitecustomize.py and nothing else that can be imported:
    # a file named __pycache__ keeps Python 3 from writing its bytecode there, and a directory
    # named sitecustomize.pyc keeps Python 2 from writing its own (both fail silently).
    for name, make in (("__pycache__", lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                                                     | os.O_NOFOLLOW, 0o400))),
                       ("sitecustomize.pyc", lambda p: os.mkdir(p, 0o500))):
        try:
            make(os.path.join(here, name))
        except FileExistsError:
            pass


def withdraw(service_id: str) -> None:
    """Stop capturing into this service. With no other service published, nothing of the
    capture is left: the directory, the variables, the wrapper. Never raises."""
    before = list(_state.published)
    _state.published = [c for c in _state.published if c.service_id != service_id]
    if _state.published == before or _state.here is None:
        return
    here = _state.here
    try:
        if _state.published:
            _write_atomic(os.path.join(here, "config.json"), _state.published[-1].to_json())
            return
        _unhook_multiprocessing()
        os.environ.pop(ENV, None)
        current = os.environ.get("PYTHONPATH")
        if current == _state.our_pythonpath:  # as we left it: put back what was there
            if _state.saved_pythonpath is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = _state.saved_pythonpath
        elif current is not None:  # changed since: take out our entry only
            parts = [p for p in current.split(os.pathsep) if p != here]
            if parts:
                os.environ["PYTHONPATH"] = os.pathsep.join(parts)
            else:
                os.environ.pop("PYTHONPATH", None)
        _state.here = None
        for name in ("config.json", "sitecustomize.py"):
            try:
                os.unlink(os.path.join(here, name))
            except OSError:
                pass
        import shutil
        shutil.rmtree(here, ignore_errors=True)  # and sitecustomize's __pycache__, if any
    except Exception as exc:  # the service must stop whatever happens here
        try:
            os.write(2, f"mplog: withdrawing the capture of children failed: {exc}\n".encode())
        except OSError:
            pass


def _clean_stale(root: str) -> None:
    # A main process killed while capturing leaves its directory: remove those of dead
    # processes, if this user made them (another user's directory at such a name is theirs).
    from .._common.spool import process_alive
    import shutil
    prefix = f"mplog-children-{os.getuid()}-"
    try:
        entries = [e for e in os.scandir(root) if e.name.startswith(prefix)]
    except OSError:
        return
    for entry in entries:
        try:
            pid, start = (int(x) for x in entry.name[len(prefix):].split("-")[:2])
        except ValueError:
            continue
        if not process_alive(pid, start) and _is_ours(entry.path):
            shutil.rmtree(entry.path, ignore_errors=True)


def clean_environ(env: Dict[str, str]) -> Dict[str, str]:
    """``env`` without the capture (for processes mplog starts itself: the listener)."""
    value = env.pop(ENV, None)
    if value and env.get("PYTHONPATH"):
        here = value.partition(":")[2]
        parts = [p for p in env["PYTHONPATH"].split(os.pathsep) if p != here]
        if parts:
            env["PYTHONPATH"] = os.pathsep.join(parts)
        else:
            del env["PYTHONPATH"]
    return env


# -- a captured child -------------------------------------------------------------------------
class CapturedHandler(SpoolHandler):
    """The handler of a process that mplog captured: the service's handler while the service
    runs; after it stops, absent (records go where logging sends them with no handler), until
    the main process publishes another service, which it then follows."""

    _emit_is_ours = True  # while the service runs, emit() adds nothing: handle() sees to the rest

    def __init__(self, config: WorkerConfig, here: str) -> None:
        super().__init__(config)
        self.here = here
        self._seen: Optional[Tuple[int, int]] = None

    def handle(self, record: logging.LogRecord) -> Any:
        if self.channel.stopped():
            return logging.Handler.handle(self, record)  # filters, then emit(): follow, or no handler
        return SpoolHandler.handle(self, record)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self.channel.stopped():
                successor = self._follow()
                if successor is None:
                    _without_handler(record)
                else:
                    successor.emit(record)
                return
        except Exception:
            self.handleError(record)
            return
        SpoolHandler.emit(self, record)

    def _follow(self) -> Optional["CapturedHandler"]:
        path = os.path.join(self.here, "config.json")
        try:
            st = os.lstat(path)
        except OSError:
            return None
        key = (st.st_ino, st.st_mtime_ns)
        if key == self._seen:
            return None
        self._seen = key
        cfg = _read_config(self.here)
        if cfg is None:
            return None
        if cfg.service_id == self.config.service_id:
            return None
        handler = _install_captured(self.here, cfg)
        return handler if not handler.channel.stopped() else None


def _without_handler(record: logging.LogRecord) -> None:
    """What logging does with a record that finds no handler: ``lastResort`` (WARNING and up,
    to stderr), unless another handler on the record's way up took it."""
    last = logging.lastResort
    if last is None or record.levelno < last.level:
        return
    logger: Optional[logging.Logger] = logging.getLogger(record.name) if record.name != "root" else logging.root
    while logger is not None:
        if any(not isinstance(h, CapturedHandler) for h in logger.handlers):
            return
        if not logger.propagate:
            break
        logger = logger.parent
    last.handle(record)


def _install_captured(here: str, cfg: WorkerConfig) -> CapturedHandler:
    handler = install(cfg, handler_factory=lambda c: CapturedHandler(c, here))
    assert isinstance(handler, CapturedHandler)
    _state.here = here
    os.environ[ENV] = f"{os.getpid()}:{here}"  # this process's own children are captured too
    _hook_multiprocessing()
    return handler


def _defer(here: str, cfg: WorkerConfig) -> None:
    """Install when the process starts its work (``BaseProcess._bootstrap``), as the initializer
    would: after the child has unpickled its target and imported what that needs, so a library
    that sets up logging at import (``distributed`` adds its own stderr handler only while the
    root has none) behaves as it does without mplog, and the root's handlers are replaced."""
    import multiprocessing.process as mpp
    _state.pending = (here, cfg)
    original = getattr(mpp.BaseProcess, "_bootstrap")
    if getattr(original, "_mplog", False):
        return

    def _bootstrap(self: Any, *args: Any, **kwargs: Any) -> Any:
        setattr(mpp.BaseProcess, "_bootstrap", original)  # once; a forked grandchild inherits the handler
        pending, _state.pending = _state.pending, None
        if pending is not None:
            try:
                _install_captured(*pending)
            except Exception as exc:
                try:
                    sys.stderr.write(f"mplog: process {os.getpid()} could not join the log service: "
                                     f"{type(exc).__name__}: {exc}\n")
                except Exception:
                    pass
        return original(self, *args, **kwargs)

    setattr(_bootstrap, "_mplog", True)
    setattr(mpp.BaseProcess, "_bootstrap", _bootstrap)


def boot(here: str) -> None:
    """From the capture directory's sitecustomize, in a new pool worker."""
    cfg = _read_config(here)
    if cfg is None:
        raise PermissionError(errno.EPERM, "no config.json of this user in the capture directory", here)
    _defer(here, cfg)


def adopt(here: str, config_json: str) -> None:
    """From a spawn or forkserver child's preparation data: log to the parent's service."""
    cfg = WorkerConfig.from_json(config_json)
    current = _worker._installed
    if current is not None and current.config.service_id == cfg.service_id:
        return  # under fork or forkserver, the handler came with the process
    _defer(here, cfg)  # the parent's choice wins over sitecustomize's


def is_captured() -> bool:
    """True when this process logs through a handler that mplog installed by itself."""
    return isinstance(_worker._installed, CapturedHandler)


def release() -> Optional[WorkerConfig]:
    """Take out the captured handler (an explicit route, such as ``mplog.dask``'s worker plugin,
    takes over); ``resume()`` puts it back. Returns the released handler's config, or None."""
    handler = _worker._installed
    if not isinstance(handler, CapturedHandler):
        return None
    uninstall(handler)
    _state.suspended = handler
    return handler.config


def resume() -> None:
    """Put back what ``release()`` took out, unless something else was installed since."""
    handler, _state.suspended = _state.suspended, None
    if handler is not None and _worker._installed is None:
        logging.getLogger().addHandler(handler)
        _worker._installed = handler


def _after_fork_in_child() -> None:
    # A forked child of a capturing process captures its own children in turn.
    if _state.here is not None and ENV in os.environ:
        os.environ[ENV] = f"{os.getpid()}:{_state.here}"


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
