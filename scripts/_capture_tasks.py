"""Task functions for capture_table.py, in a module of their own so that every pool (and a pool
nested in a loky worker, which pickles by reference) finds them by name."""

from __future__ import annotations

import logging
import os


def task(i: int) -> int:
    """Log one INFO record from this worker; return its pid."""
    logging.getLogger("table").info("capture-table item %d", i)
    return os.getpid()


def nested_joblib(k: int) -> int:
    """Inside a joblib worker, a loky Parallel of its own: its workers log ten records. (A
    multiprocessing pool cannot start inside a loky worker: loky sets the start method to
    "loky", which multiprocessing's own children do not know.)"""
    import joblib
    joblib.Parallel(n_jobs=2, backend="loky")(joblib.delayed(task)(i) for i in range(k * 10, k * 10 + 10))
    return os.getpid()


def nested_ppe(k: int) -> int:
    """Inside a spawn ProcessPoolExecutor worker, a forkserver one: its workers log ten records."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("forkserver")) as pool:
        list(pool.map(task, range(k * 10, k * 10 + 10)))
    return os.getpid()


def process_target(k: int) -> None:
    for i in range(k * 10, k * 10 + 10):
        task(i)
