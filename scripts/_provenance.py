"""Which mplog a script measures: kept for the scripts that import it from here; the code is in
``_toolkit``, the scripts' one shared module."""

from _toolkit import mplog_source

__all__ = ["mplog_source"]
