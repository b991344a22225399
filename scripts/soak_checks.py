"""The soak's records and their verification: the self-checking message every worker logs, the
reader that checks every block of the full logs and every line of the simplified logs, and
``verify``, which holds them against the service's accounting and the workers' own reports.

A record is ``w{id}.{gen} seq {i} len {n} chk {crc32} {body}``: unique per (worker, generation,
seq), its body derived from those, its CRC over the rest, so a torn, mixed or misattributed
record cannot pass for an intact one.
"""

from __future__ import annotations

import os
import re
import time
import zlib
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from _toolkit import (APP_GONE, DEATH, MESSAGE, RESTART, SIMPLE_LINE, SUMMARY, UNSEEN, Checks, Tally, mb,
                      read_blocks, read_lines)

if TYPE_CHECKING:
    from soak import Soak

WORKER_LOGGER = "soak.worker"
MAIN_LOGGER = "soak.main"
REPORT_EVERY = 100
SMALL_BODY = 24


# -- the records ---------------------------------------------------------------------------------
def record_body(wid: int, gen: int, seq: int, size: int) -> str:
    unit = f"{wid}:{gen}:{seq}/"
    return (unit * (size // len(unit) + 1))[:size]


def record_size(seq: int, big_every: int, big_size: int) -> int:
    """Every ``big_every``-th record is big (several frames in the ring), the rest small."""
    return big_size if big_every and seq % big_every == big_every - 1 else SMALL_BODY


def record_message(wid: int, gen: int, seq: int, size: int) -> str:
    head = f"w{wid}.{gen} seq {seq} len {size}"
    body = record_body(wid, gen, seq, size)
    chk = zlib.crc32(f"{head} {body}".encode())
    return f"{head} chk {chk:08x} {body}"


WORKER_MSG = re.compile(rb"^w(\d+)\.(\d+) seq (\d+) len (\d+) chk ([0-9a-f]{8}) (.*)$", re.S)
MAIN_MSG = re.compile(rb"^main event (\d+): ")


def check_worker_message(m: "re.Match[bytes]") -> bool:
    wid, gen, seq, size = (int(m.group(i)) for i in range(1, 5))
    body = m.group(6)
    if len(body) != size or body != record_body(wid, gen, seq, size).encode():
        return False
    head = f"w{wid}.{gen} seq {seq} len {size}".encode()
    return zlib.crc32(head + b" " + body) == int(m.group(5), 16)



class Verification:
    def __init__(self, pids: Dict[Tuple[int, int], Optional[int]], worker_logger: str = WORKER_LOGGER) -> None:
        self.pids = pids
        self.worker_logger = worker_logger.encode()
        self.full = Tally()
        self.simple = Tally()
        self.files: List[Tuple[str, int]] = []
        self.blocks = 0
        self.app_records = 0         # blocks of any logger but mplog
        self.main_records = 0
        self.main_seen: Dict[int, int] = {}
        self.other_app = 0
        self.garbled = 0             # lines/blocks that do not parse
        self.bad_records = 0         # worker records that parse but are not intact
        self.examples: List[str] = []
        self.restart_notices = 0
        self.restart_lost = 0
        self.restart_reasons: Dict[str, int] = {}
        self.summaries: List[Tuple[int, int, int]] = []
        self.summary_hows: List[str] = []   # "" for "mplog stopped:", else the parenthesis
        self.app_gone_notices = 0
        self.death_pids: Dict[int, bytes] = {}  # pid -> how it ended, from the full log's records
        self.simple_deaths = 0
        self.other_notices: List[str] = []
        self.simple_lines = 0
        self.simple_garbled = 0
        self.simple_main = 0
        self.simple_restart_notices = 0

    def bad(self, what: str, path: str, lineno: int, line: bytes) -> None:
        if len(self.examples) < 8:
            self.examples.append(f"{what} at {os.path.basename(path)}:{lineno}: {line[:160]!r}")

    # -- full logs: blocks -------------------------------------------------------------------------
    def full_log(self, path: str) -> None:
        self.files.append((path, os.path.getsize(path)))
        for item in read_blocks(path):
            if isinstance(item[0], str):
                why, lineno, line = item
                self.garbled += 1
                self.bad(why, path, lineno, line)
            else:
                self.block(*item, path)

    def block(self, header: "re.Match[bytes]", body: List[bytes], lineno: int, path: str) -> None:
        self.blocks += 1
        if not body or not body[0].startswith(MESSAGE):
            self.garbled += 1
            self.bad("block without a message", path, lineno, header.group(0))
            return
        logger = header["logger"]
        msg = body[0][len(MESSAGE):]
        if logger == b"mplog":
            text = b"\n".join([msg] + [b[len(MESSAGE):] for b in body[1:] if b.startswith(b" " * len(MESSAGE))])
            m = RESTART.match(text)
            if m:
                self.restart_notices += 1
                self.restart_lost += int(m.group(2))
                reason = m.group(1).decode()
                self.restart_reasons[reason] = self.restart_reasons.get(reason, 0) + 1
                return
            m = SUMMARY.match(text)
            if m:
                self.summaries.append((int(m.group(2)), int(m.group(3)), int(m.group(4))))
                self.summary_hows.append((m.group(1) or b"").decode())
                return
            if text == APP_GONE:
                self.app_gone_notices += 1
                return
            m = DEATH.match(text) or UNSEEN.match(text)
            if m:
                self.death_pids[int(m.group(1))] = m.group(2) if m.re is DEATH else b"unseen"
                return
            self.other_notices.append(f"{os.path.basename(path)}:{lineno}: {text[:200]!r}")
            return
        self.app_records += 1
        if logger == self.worker_logger:
            m = WORKER_MSG.match(msg)
            if m is None or len(body) != 1:
                self.bad_records += 1
                self.bad("malformed worker record", path, lineno, msg)
                return
            key = (int(m.group(1)), int(m.group(2)))
            if not check_worker_message(m) or self.pids.get(key) != int(header["pid"]):
                self.bad_records += 1
                self.bad("corrupt or misattributed worker record", path, lineno, header.group(0) + b" " + msg)
                return
            self.full.add(key, int(m.group(3)))
        elif logger == MAIN_LOGGER.encode():
            m = MAIN_MSG.match(msg)
            if m is None:
                self.bad_records += 1
                self.bad("malformed main record", path, lineno, msg)
                return
            self.main_records += 1
            n = int(m.group(1))
            self.main_seen[n] = self.main_seen.get(n, 0) + 1
        else:
            self.other_app += 1
            self.bad(f"record of an unexpected logger {logger!r}", path, lineno, msg)

    # -- simplified logs: lines --------------------------------------------------------------------
    def simplified_log(self, path: str) -> None:
        self.files.append((path, os.path.getsize(path)))
        for lineno, line, complete in read_lines(path):
            if not complete:
                self.simple_garbled += 1
                self.bad("unterminated last line", path, lineno, line)
                break
            if line.startswith(b"    "):  # a continuation (the stop summary's warnings)
                continue
            m = SIMPLE_LINE.match(line)
            if m is None:
                self.simple_garbled += 1
                self.bad("not a simplified line", path, lineno, line)
                continue
            self.simple_lines += 1
            text = m.group(1)
            if text.startswith(b"w"):
                wm = WORKER_MSG.match(text)
                if wm is None or not check_worker_message(wm):
                    self.simple_garbled += 1
                    self.bad("corrupt worker line", path, lineno, line)
                    continue
                self.simple.add((int(wm.group(1)), int(wm.group(2))), int(wm.group(3)))
            elif MAIN_MSG.match(text):
                self.simple_main += 1
            elif text.startswith(b"WARNING: listener restarted after "):
                self.simple_restart_notices += 1
            elif text.startswith((b"mplog stopped: ", b"mplog stopped (")) or text == b"WARNING: " + APP_GONE:
                pass
            elif DEATH.match(text) or UNSEEN.match(text):
                self.simple_deaths += 1
            else:
                self.simple_garbled += 1
                self.bad("unexpected simplified line", path, lineno, line)


def verify(soak: "Soak") -> bool:
    """Parse every file of the soak, print the report and its checks; True if all passed."""
    final = soak.final
    assert final is not None
    rec = final["records"]
    svc = soak.svc
    v = Verification({w.key: w.pid for w in soak.history})
    t_parse = time.monotonic()
    full_paths = [f for f, _s in soak.rotated if f] + [str(svc.full_path)]
    simple_paths = [s for _f, s in soak.rotated if s] + [str(svc.simplified_path)]
    for p in full_paths:
        if os.path.exists(p):
            v.full_log(p)
    for p in simple_paths:
        if os.path.exists(p):
            v.simplified_log(p)
    t_parse = time.monotonic() - t_parse

    # What the workers say they logged, against what the files hold.
    clean_logged = killed_low = killed_high = 0
    gaps = beyond = 0
    beyond_examples: List[str] = []
    for w in soak.history:
        distinct, top = v.full.present(w.key)
        clean = w.done and not w.killed and not w.unstoppable
        if clean:
            low = high = w.count
        else:  # killed: it logged at least its last report, at most REPORT_EVERY more
            low, high = max(w.count, top), w.count + REPORT_EVERY
        if clean:
            clean_logged += w.count
        else:
            killed_low += low
            killed_high += high
        if top > high:
            beyond += 1
            if len(beyond_examples) < 5:
                beyond_examples.append(f"w{w.wid}.{w.gen}: seq {top - 1} in the files, reported {w.count}")
        # Missing: below what a clean worker reported; for a killed one, below its highest record
        # in the files or its last report (those calls had returned: their records were in the
        # spool, which a kill of the worker or of the listener does not lose).
        gaps += max(0, w.count - distinct) if clean else max(0, max(min(top, high), w.count) - distinct)
    main_missing = soak.main_events - len(v.main_seen)
    main_dups = sum(n - 1 for n in v.main_seen.values() if n > 1)
    worker_sent = rec["sent"] - soak.main_events  # the main process logs nothing else
    killed_sent = worker_sent - clean_logged
    in_files = v.full.records + v.main_records + v.other_app
    a_workers = soak.args.workers

    check = Checks()
    check(soak.interrupted is None, "the chaos ran for the requested duration"
          + (f" ({soak.interrupted}, after {soak.elapsed:.1f} s)" if soak.interrupted else ""))
    unexpected = [w for w in soak.history if w.unexpected]
    unstoppable = [w for w in soak.history if w.unstoppable]
    check(not unexpected and not unstoppable,
          f"every worker death was one of our kills (unexpected exits {len(unexpected)}"
          + (": " + ", ".join(f"w{w.wid}.{w.gen} {w.unexpected}" for w in unexpected[:5]) if unexpected else "")
          + f"; did not stop when asked {len(unstoppable)})")
    check(soak.flushed is True, f"svc.flush() before stop returned True (got {soak.flushed})")
    check(v.garbled == 0, f"every block of the full logs parses (garbled {v.garbled})")
    check(v.simple_garbled == 0, f"every line of the simplified logs parses (garbled {v.simple_garbled})")
    check(v.bad_records == 0 and v.other_app == 0,
          f"every application record is intact and ours: body, CRC, pid (bad {v.bad_records}, "
          f"foreign {v.other_app})")
    check(v.full.dups == 0 and main_dups == 0,
          f"no record twice in the full logs (duplicates {v.full.dups + main_dups}"
          + (": " + ", ".join(v.full.dup_examples) if v.full.dup_examples else "") + ")")
    check(v.simple.dups == 0, f"no record twice in the simplified logs (duplicates {v.simple.dups})")
    check(in_files == rec["written"],
          f"application records in the files == written ({in_files} vs {rec['written']}, "
          f"difference {in_files - rec['written']:+d})")
    check(v.simple.same_as(v.full) and v.simple_main == v.main_records,
          f"the simplified logs hold the same records as the full logs ({v.simple.records + v.simple_main} vs "
          f"{v.full.records + v.main_records})")
    total = rec["written"] + rec["dropped"] + rec["diverted"] + rec["lost"]
    check(rec["sent"] == total,
          f"sent == written + dropped + diverted + lost ({rec['sent']} vs {total})")
    counted = rec["torn"] + rec["lost_with_listener"] + rec["unattributed_lost"]
    check(rec["lost"] == counted,
          f"lost == torn + lost_with_listener + unattributed_lost ({rec['lost']} vs {rec['torn']} + "
          f"{rec['lost_with_listener']} + {rec['unattributed_lost']})")
    check(rec["unattributed_lost"] == 0,
          f"unattributed_lost == 0: lost equals the counted losses (unattributed {rec['unattributed_lost']})")
    check(v.restart_lost == 0 and rec["lost_with_listener"] == 0 and rec["lost"] == 0,
          f"a listener kill loses nothing: every restart notice says 0 records lost, lost_with_listener == 0, "
          f"lost == 0 (over {soak.listener_kills} kills: notices say {v.restart_lost}, lost_with_listener "
          f"{rec['lost_with_listener']}, lost {rec['lost']}, torn {rec['torn']})")
    check(v.restart_notices == final["restarts"] == soak.listener_kills,
          f"one restart per listener kill and one notice per restart (kills {soak.listener_kills}, "
          f"restarts {final['restarts']}, notices {v.restart_notices})")
    killed_pids = {w.pid for w in soak.history if w.killed or w.unstoppable}
    unseen = sum(1 for how in v.death_pids.values() if how == b"unseen")
    check(set(v.death_pids) == killed_pids and set(v.death_pids.values()) <= {b"SIGKILL", b"unseen"}
          and unseen <= soak.listener_kills and v.simple_deaths == len(killed_pids),
          f"one record of its end per worker we killed, SIGKILL, in both logs, and none for any other process "
          f"(killed {len(killed_pids)}, records {len(v.death_pids)} {sorted(set(v.death_pids.values()))}, "
          f"simplified lines {v.simple_deaths}; killed while a killed listener was being replaced, so "
          f"'exit status unknown': {unseen})")
    summary_ok = len(v.summaries) == 1 and v.summaries[0][0] == rec["written"] and v.summary_hows == [""]
    check(summary_ok and not v.other_notices and not v.app_gone_notices,
          f"one stop summary, its count == written, no other notice ({v.summaries}; other notices "
          f"{len(v.other_notices) + v.app_gone_notices})")
    check(killed_low <= killed_sent <= killed_high and clean_logged <= worker_sent,
          f"sent agrees with the workers' reports (clean workers {clean_logged}; killed workers: sent "
          f"{killed_sent}, reports allow {killed_low}..{killed_high})")
    check(beyond == 0, f"no record beyond what its worker logged ({beyond}"
          + (": " + ", ".join(beyond_examples) if beyond_examples else "") + ")")
    missing = gaps + max(0, main_missing)
    allowed = rec["lost"] + rec["dropped"] + rec["diverted"]
    check(missing <= allowed, f"records missing from the files <= lost + dropped + diverted ({missing} <= {allowed})")
    reopens = final.get("reopens")
    check(not soak.rotations or (reopens is not None and reopens >= 2 * soak.rotations),
          f"the listener reopened both files at each rotation: reopens >= 2 x rotations ({reopens} vs "
          f"{soak.rotations} rotations; {soak.listener_kills} listener restarts)")
    check(soak.end_rings is not None and soak.end_rings <= a_workers + 1,
          f"the rings of killed workers are retired: rings in the spool at the end <= workers + 1 "
          f"({soak.end_rings} <= {a_workers + 1}; most seen {soak.max_rings}; {len(soak.history)} worker generations)")
    check(soak.spool_after_stop is False,
          f"the spool directory is gone after stop() ({soak.spool}: "
          f"{'still there' if soak.spool_after_stop else 'gone' if soak.spool_after_stop is False else 'unknown'}"
          f"{', spool_kept ' + str(final.get('spool_kept')) if final.get('spool_kept') else ''})")
    lf0, lf1 = soak.start_listener.get("base_fds"), soak.end_listener.get("base_fds")
    check(lf0 is not None and lf1 is not None and lf1 <= lf0 + 2,
          f"listener fds did not grow, its rings' aside (start {lf0} + {soak.start_listener.get('rings')} rings, "
          f"end {lf1} + {soak.end_listener.get('rings')} rings)")
    mf0, mf1 = soak.main_fds_start, soak.main_fds_end
    check(mf0 is not None and mf1 is not None and mf1 <= mf0 + 3,
          f"main process fds did not grow (start {mf0}, end {mf1})")

    # -- the report --------------------------------------------------------------------------------
    a = soak.args
    sizes = sum(s for _p, s in v.files)
    print()
    print("=" * 100)
    print(f"mplog soak report: {soak.elapsed:.1f} s of chaos (requested {a.duration:g}), {a.workers} workers x "
          f"{a.rate:g} records/s, start method {a.start_method}, seed {a.seed}")
    if soak.interrupted:
        print(f"NOTE: {soak.interrupted}")
    print(f"logs: {soak.dir}")
    print(f"chaos: listener kills {soak.listener_kills} (postponed {soak.listener_kill_skipped} while it was "
          f"restarting), worker kills {soak.worker_kills} ({len(soak.history)} worker generations), "
          f"rotations {soak.rotations} (listener reopens {final.get('reopens', '?')}), unexpected worker exits "
          f"{len(unexpected)}")
    print(f"records (final health):  sent {rec['sent']}   written {rec['written']}   dropped {rec['dropped']}   "
          f"diverted {rec['diverted']}   lost {rec['lost']}")
    print(f"  lost = torn {rec['torn']} + lost_with_listener {rec['lost_with_listener']} + "
          f"unattributed_lost {rec['unattributed_lost']}")
    print(f"  replaced {rec.get('replaced')}   malformed_frames {rec.get('malformed_frames')}   "
          f"achieved rate {rec['sent'] / max(soak.elapsed, 1e-9):,.0f} records/s")
    print(f"restarts {final['restarts']} (last exit {(final.get('last_exit') or {}).get('name')}); restart "
          f"notices {v.restart_notices} {v.restart_reasons}, records lost in them {v.restart_lost}")
    s0, s1 = soak.start_listener, soak.end_listener
    print(f"listener at start: pid {s0.get('pid')} rss {mb(s0.get('rss'))} fds {s0.get('fds')}   "
          f"at end: pid {s1.get('pid')} rss {mb(s1.get('rss'))} fds {s1.get('fds')} (up {s1.get('uptime')} s)   "
          f"max seen: rss {mb(soak.max_rss)} fds {soak.max_fds}")
    print(f"main process fds: start {mf0} end {mf1}")
    print(f"spool: {soak.spool}; rings at the end {soak.end_rings} (most seen {soak.max_rings}); after stop() "
          f"{'still there' if soak.spool_after_stop else 'gone'}; reopens {final.get('reopens')}")
    print(f"files: {len(v.files)} ({len(full_paths)} full, {len(simple_paths)} simplified), {mb(sizes)}, "
          f"parsed in {t_parse:.1f} s; full-log blocks {v.blocks}: application {in_files} (worker "
          f"{v.full.records}, main {v.main_records}, other {v.other_app}), mplog notices "
          f"{v.blocks - in_files}; simplified lines {v.simple_lines}")
    print(f"workers: clean exits logged {clean_logged}; records missing from the files {missing} "
          f"(main events missing {max(0, main_missing)})")
    for e in v.examples:
        print(f"  example: {e}")
    for n in v.other_notices[:5]:
        print(f"  other notice: {n}")
    return check.report()


