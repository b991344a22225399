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
    return text + ("; compiled code (mplog._speedups)" if _compiled.enabled() else "; Python code only (no mplog._speedups)")
