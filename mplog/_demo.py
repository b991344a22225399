"""The demo: a believable batch pipeline (load → align → score) over a process pool per stage,
then a report stage on joblib's workers (made by joblib, with no mplog code: issue 13)."""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import random
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, List, Optional, Tuple

import mplog

log = logging.getLogger("demo.pipeline")


def load(item: int) -> Tuple[int, float]:
    wlog = logging.getLogger("demo.load")
    with mplog.context(stage="load", sample=f"S{item:04d}"):
        wlog.debug("reading sample %d from disk", item)
        value = random.Random(item).gauss(10.0, 2.0)
        if item % 97 == 13:
            warnings.warn(f"sample S{item:04d} has a low read count", UserWarning, stacklevel=1)
        return item, value


def align(item: Tuple[int, float]) -> Tuple[int, float]:
    idx, value = item
    wlog = logging.getLogger("demo.align")
    with mplog.context(stage="align", sample=f"S{idx:04d}"):
        score = sum(math.sin(value * k) for k in range(40000)) / 20.0
        wlog.debug("aligned sample %d: raw score %.4f", idx, score)
        if idx % 40 == 2:
            wlog.info("sample S%04d needed a second pass", idx)
        if idx == 42:
            try:
                raise ValueError(f"sample S{idx:04d}: reference contig missing")
            except ValueError:
                wlog.exception("alignment failed, using a fallback reference")
        return idx, score


def score(item: Tuple[int, float]) -> float:
    idx, raw = item
    wlog = logging.getLogger("demo.score")
    result = 1.0 / (1.0 + math.exp(-raw / 100.0))
    wlog.debug("sample %d scored %.4f", idx, result)
    if idx % 50 == 0:
        wlog.info("scored sample S%04d: %.3f", idx, result, extra={"is_user_message": True})
    return result


def summarise(chunk: List[float]) -> Tuple[int, float]:
    """Runs in a loky worker that joblib made without mplog's initializer: it logs all the same."""
    wlog = logging.getLogger("demo.report")
    with mplog.context(stage="report"):
        mean = sum(chunk) / len(chunk)
        wlog.debug("summarising %d scores", len(chunk))
        wlog.info("summarised %d scores: mean %.3f", len(chunk), mean)
        return len(chunk), mean


def report(data: List[float], workers: int) -> None:
    try:
        import joblib  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        log.info("joblib is not installed: no report stage (pip install joblib)")
        return
    size = max(1, len(data) // (workers * 2))
    chunks = [data[i:i + size] for i in range(0, len(data), size)]
    parts = joblib.Parallel(n_jobs=workers)(joblib.delayed(summarise)(chunk) for chunk in chunks)
    log.info("stage report done: %d chunks on joblib's workers, %d scores", len(parts), sum(n for n, _ in parts))


def run_demo(directory: str, workers: int, items: int, start_method: Optional[str]) -> int:
    ctx = multiprocessing.get_context(start_method)
    started = time.monotonic()
    with mplog.LogService(directory, name="demo", console="INFO") as svc:
        log.info("demo pipeline: %d items, %d workers, start method %s", items, workers, ctx.get_start_method())
        data: List[Any] = list(range(items))
        stages: List[Callable[[Any], Any]] = [load, align, score]
        for stage in stages:
            with ProcessPoolExecutor(workers, mp_context=ctx, **svc.pool_kwargs()) as pool:
                results = pool.map(stage, data, chunksize=max(1, items // (workers * 8)))
                data = list(mplog.progress(results, total=len(data), desc=f"{stage.__name__:>5}"))
            log.info("stage %s done: %d items", stage.__name__, len(data))
        log.info("mean score %.4f", sum(data) / len(data))
        report(data, workers)
        svc.flush()
        health = svc.health()
    final = svc.health()
    out = sys.stdout
    out.write(f"\nDone in {time.monotonic() - started:.1f} s.\n")
    out.write(f"  simplified log: {svc.simplified_path}\n  full log:       {svc.full_path}\n")
    rec = final["records"]
    out.write(f"  stop summary:   {rec['written']} records written, {rec['dropped']} dropped, {rec['lost']} lost\n")
    out.write("  health while running:\n")
    out.write("    " + json.dumps(health, indent=1, sort_keys=True).replace("\n", "\n    ") + "\n")
    return 0
