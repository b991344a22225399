"""The record's whole path, under fork, spawn and forkserver: pools, processes, formats."""

from __future__ import annotations

import logging
import re
from concurrent.futures import ProcessPoolExecutor


import mplog
from conftest import app_blocks, read_blocks, simplified_lines

import workers


def test_process_pool_executor_every_record_once_in_order(service, ctx):
    """Every record from every worker is in the full log exactly once, in per-process order."""
    svc = service()
    logging.getLogger("t.main").info("main started")
    with ProcessPoolExecutor(3, mp_context=ctx, **svc.pool_kwargs()) as pool:
        pids = list(pool.map(workers.log_n, [(f"task{k}", 200) for k in range(6)]))
    assert svc.flush(30)
    blocks = app_blocks(svc.full_path)
    msgs = [b["message"] for b in blocks]
    assert msgs.count("main started") == 1
    for k in range(6):
        mine = [m for m in msgs if m.startswith(f"task{k} ")]
        assert mine == [f"task{k} item {i}" for i in range(200)]
    assert {b["pid"] for b in blocks if b["logger"] == "t.worker"} == set(pids)
    h = svc.health()
    assert h["records"]["written"] == 1201 == len(blocks)
    assert h["records"]["lost"] == h["records"]["dropped"] == 0


def test_multiprocessing_pool_and_inherited_handlers_replaced(service, ctx, tmp_path):
    """A forked child inherits the parent's root handlers; worker_init replaces them, so no
    line is written twice and the parent's FileHandler is not used by workers."""
    stray = tmp_path / "stray.log"
    root = logging.getLogger()
    fh = logging.FileHandler(stray)
    root.addHandler(fh)
    try:
        svc = service()
        with ctx.Pool(2, **svc.pool_kwargs()) as pool:
            handlers = pool.map(workers.root_handlers, range(4))
            pool.map(workers.log_n, [("pool", 50)])
        assert svc.flush(30)
    finally:
        root.removeHandler(fh)
        fh.close()
    for _pid, names in handlers:
        assert names == ["SpoolHandler"]
    assert "pool item" not in stray.read_text()
    msgs = [b["message"] for b in app_blocks(svc.full_path)]
    assert msgs == [f"pool item {i}" for i in range(50)]


def test_plain_process_children(service, ctx):
    svc = service()
    procs = [ctx.Process(target=workers.process_target, args=(svc.worker_config, f"proc{k}", 30)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert svc.flush(30)
    msgs = [b["message"] for b in app_blocks(svc.full_path)]
    for k in range(2):
        assert [m for m in msgs if m.startswith(f"proc{k} ")] == [f"proc{k} item {i}" for i in range(30)]


def test_nested_pool_logs_to_same_service(service, ctx):
    """A worker that starts its own pool with mplog.pool_kwargs(): grandchildren log here too."""
    svc = service()
    # Pool workers are daemonic and may not have children, so the outer worker is a Process.
    p = ctx.Process(target=_run_nested, args=(svc.worker_config, ctx.get_start_method()))
    p.start()
    p.join(90)
    assert p.exitcode == 0
    assert svc.flush(30)
    msgs = [b["message"] for b in app_blocks(svc.full_path)]
    for k in range(2):
        assert [m for m in msgs if m.startswith(f"nested-{k} ")] == [f"nested-{k} item {i}" for i in range(10)]


def _run_nested(config, method):
    mplog.worker_init(config)
    workers.nested_pool((method, "nested", 10))


def test_levels_and_simplified_selection(service, ctx):
    """Full log at ``level``; simplified at ``simplified_level`` plus is_user_message records;
    records below ``level`` are not captured at all, user message or not."""
    svc = service(level="DEBUG", simplified_level="WARNING")
    with ProcessPoolExecutor(1, mp_context=ctx, **svc.pool_kwargs()) as pool:
        pool.submit(workers.log_levels, "L").result(60)
    assert svc.flush(30)
    full = [b["message"] for b in app_blocks(svc.full_path)]
    assert full == ["L debug", "L info", "L warning", "L user"]
    simple = [ln.split("] ", 1)[1] for ln in simplified_lines(svc.simplified_path) if "mplog" not in ln]
    assert simple == ["WARNING: L warning", "L user"]


def test_formats_exactly(service, ctx):
    svc = service()
    with ProcessPoolExecutor(1, mp_context=ctx, **svc.pool_kwargs()) as pool:
        pool.submit(workers.log_exception, "E").result(60)
        pool.submit(workers.log_levels, "F").result(60)
    assert svc.flush(30)
    blocks = app_blocks(svc.full_path)
    exc = blocks[0]
    assert exc["level"] == "ERROR" and exc["logger"] == "t.exc" and exc["where"].startswith("workers.py:")
    body = "\n".join(exc["lines"])
    assert "Traceback (most recent call last):" in body
    assert "KeyError: 'inner'" in body and "ValueError: bad input" in body  # chained
    assert "direct cause" in body
    lines = simplified_lines(svc.simplified_path)
    pat = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] ")
    assert all(pat.match(ln) for ln in lines)
    err = [ln for ln in lines if "E failed" in ln]
    assert len(err) == 1 and err[0].endswith("ERROR: E failed (ValueError: bad input)")
    assert "Traceback" not in svc.simplified_path.read_text()
    assert any(ln.endswith("] F info") for ln in lines)
    assert any(ln.endswith("] WARNING: F warning") for ln in lines)


def test_context_and_extras_in_threads(service, ctx):
    svc = service()
    with ProcessPoolExecutor(1, mp_context=ctx, **svc.pool_kwargs()) as pool:
        pool.submit(workers.threads_with_context, "C").result(60)
    assert svc.flush(30)
    blocks = [b for b in app_blocks(svc.full_path) if b["logger"] == "t.ctx"]
    assert sorted((b["message"], b["context"].get("task")) for b in blocks) == [
        (f"C thread {k}", f"C-{k}") for k in range(4)]


def test_main_process_root_logger_restored(tmp_path):
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    before = (list(root.handlers), root.level)
    svc = mplog.LogService(tmp_path / "l", level="INFO")
    with svc:
        assert root.level == logging.INFO
        assert any(isinstance(h, mplog.SpoolHandler) for h in root.handlers)
        logging.getLogger("x").info("inside")
    assert (list(root.handlers), root.level) == before
    logging.getLogger("x").warning("after stop")  # goes wherever it went before, not to us
    assert [b["message"] for b in app_blocks(svc.full_path)] == ["inside"]


def test_stop_summary_health_after_stop_and_append(tmp_path):
    """stop() writes a summary (counts and distinct warnings); health() keeps working, 'down';
    a second run appends, never truncates."""
    for run in range(2):
        with mplog.LogService(tmp_path / "l") as svc:
            log = logging.getLogger("s")
            for i in range(3):
                log.warning("disk almost full")
            log.warning("slow node %s", "n1")
            log.info("hello %d", run)
        h = svc.health()
        assert h["status"] == "down"
        assert h["records"] == {**h["records"], "sent": 5, "written": 5, "dropped": 0, "lost": 0}
        assert svc.stop() == h  # idempotent
    text = svc.simplified_path.read_text()
    assert text.count("hello 0") == 1 and text.count("hello 1") == 1
    assert text.count("mplog stopped: 5 records written, 0 dropped, 0 lost; 2 distinct warning(s):") == 2
    assert "     3 x disk almost full" in text and "     1 x slow node n1" in text
    # The full log holds nothing but blocks: the summary is an mplog record there too.
    blocks = read_blocks(svc.full_path)
    assert sum(1 for b in blocks if b["logger"] == "mplog") == 2


def test_captured_warnings(service, ctx):
    svc = service()
    import warnings
    warnings.warn("careful now", UserWarning)
    assert svc.flush(30)
    blocks = app_blocks(svc.full_path)
    assert any(b["logger"] == "py.warnings" and "careful now" in b["message"] for b in blocks)


def test_worker_config_roundtrip_json(service):
    svc = service()
    cfg = svc.worker_config
    assert mplog.WorkerConfig.from_json(cfg.to_json()) == cfg
    assert svc.pool_kwargs() == {"initializer": mplog.worker_init, "initargs": (cfg,)}


def test_stdlib_queue_handler_on_svc_queue(service):
    """Code that does not want mplog's initializer can use the stdlib QueueHandler(svc.queue)."""
    import logging.handlers
    svc = service()
    lg = logging.getLogger("stdlib.qh")
    lg.propagate = False
    h = logging.handlers.QueueHandler(svc.queue)
    lg.addHandler(h)
    try:
        lg.warning("via stdlib %d", 7)
    finally:
        lg.removeHandler(h)
        lg.propagate = True
    assert svc.flush(30)
    assert [b["message"] for b in app_blocks(svc.full_path)] == ["via stdlib 7"]


def test_stack_info_is_kept(service):
    """The stdlib QueueHandler drops stack_info (3.10+); mplog writes it in the full log."""
    svc = service()
    logging.getLogger("stack").info("where am I", stack_info=True)
    assert svc.flush(10)
    body = "\n".join(app_blocks(svc.full_path)[0]["lines"])
    assert "Stack (most recent call last):" in body and "test_stack_info_is_kept" in body


def test_worker_outliving_the_service_neither_hangs_nor_loses_silently(tmp_path, ctx):
    """A worker still logging after stop(): its records go to its stderr, and it exits
    promptly (a multiprocessing.Queue producer whose reader is gone cannot exit)."""
    svc = mplog.LogService(tmp_path / "l")
    svc.start()
    parent, child = ctx.Pipe()
    err = tmp_path / "worker.stderr"
    p = ctx.Process(target=workers.log_on_command, args=(svc.worker_config, child, str(err)))
    p.start()
    try:
        parent.send("while running")
        assert parent.poll(30) and parent.recv() == "done"
        svc.stop()
        parent.send("after stop")
        assert parent.poll(30) and parent.recv() == "done"
        parent.send(None)
        p.join(30)
        assert p.exitcode == 0
    finally:
        if p.is_alive():
            p.kill()
            p.join(5)
    assert [b["message"] for b in app_blocks(svc.full_path)] == ["while running"]
    assert "WARNING: after stop" in err.read_text()
