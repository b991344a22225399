"""Which mplog a script measures: where it is imported from, and its git state."""

from __future__ import annotations

import os
import subprocess


def mplog_source() -> str:
    """``0.1.0 from /path/mplog (git abc1234, clean)``: a measurement names what it measured."""
    try:
        import mplog
    except Exception as exc:  # noqa: BLE001 - report any import failure
        return f"not importable: {exc}"
    pkg = os.path.dirname(os.path.abspath(mplog.__file__))
    text = f"{mplog.__version__} from {pkg}"
    try:
        root = subprocess.run(["git", "-C", pkg, "rev-parse", "--show-toplevel"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        if root:
            head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True, timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", pkg], capture_output=True,
                                   text=True, timeout=10).stdout.split("\n")
            changed = [line[3:] for line in dirty if line.strip()]
            text += f" (git {head}" + (f", uncommitted changes in {', '.join(changed)})" if changed else ", clean)")
    except (OSError, subprocess.SubprocessError):
        pass
    from mplog import _compiled
    text += "; compiled code (mplog._speedups)" if _compiled.enabled() else "; Python code only (no mplog._speedups)"
    return text + _bytecode_note(pkg)


def _bytecode_note(pkg: str) -> str:
    """Whether mplog's modules load from ``.pyc`` files. Without them (``PYTHONDONTWRITEBYTECODE``
    and no install step that compiled them) every import compiles, and the compiler's leftovers
    stay in the main process's heap: every forked worker's RSS carries them (~1.2 MB)."""
    import importlib.util
    sources = [os.path.join(pkg, f) for f in os.listdir(pkg) if f.endswith(".py")]
    missing = [f for f in sources if not os.path.exists(importlib.util.cache_from_source(f))]
    if not missing:
        return "; its .pyc files"
    return (f"; {len(missing)} of its {len(sources)} modules without .pyc files (imports compile; "
            f"PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r})")
