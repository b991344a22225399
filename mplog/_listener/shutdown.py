"""How the listener ends (``Shutdown``): the last drain, the final counts and the summary record.

Two ways in: ``finish`` after the supervisor's stop (a deadline it gave), and ``after_the_application``
when the main process is gone (killed, or the whole process group was signalled): then the
listener writes what the spool holds while any process of the service still runs, goes last,
and removes the spool (and the children's capture) that nobody else is left to remove.

The final counts are built from figures that each have one writer (``final_counts``), so the
summary's "lost" is exact even while writers still divert to stderr.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Optional, Tuple

from .._common.config import ListenerConfig
from .._common.counters import STATE_STOPPED, Counters, settle_accounts
from .._common.spool import remove_spool
from .control import Control
from .ends import Ends
from .intake import Intake

if TYPE_CHECKING:  # imported only where syslog is configured
    from .syslog import SyslogLink

__all__ = ["Shutdown"]


class Shutdown:
    """The listener's last steps: drain, write the ends, settle the counts, close."""

    def __init__(self, cfg: ListenerConfig, counters: Counters, intake: Intake, ends: Ends, control: Control,
                 syslog: Optional["SyslogLink"]) -> None:
        self.cfg = cfg
        self.counters = counters
        self.intake = intake
        self.ends = ends
        self.control = control
        self.syslog = syslog

    def after_the_application(self) -> None:
        """The main process is gone without stopping us: outlive its processes, then go."""
        cfg = self.cfg
        self.outlive_the_group(time.monotonic() + cfg.shutdown_timeout)
        self.intake.notice("the application exited without stopping the log service", logging.WARNING)
        self.finish("stopped (application gone)", time.monotonic() + 1.0)
        self.remove_if_empty()
        if cfg.capture_dir:  # its children's capture: nobody else is left to withdraw it
            from .._common.room import remove_own_dir
            remove_own_dir(cfg.capture_dir)  # only if it is ours

    def outlive_the_group(self, deadline: float) -> None:
        """The application is gone (killed, or the whole group was signalled): write what the
        spool holds while any of its processes still runs, and go last."""
        watch = self.ends.watch
        while time.monotonic() < deadline:
            self.intake.drain(deadline)
            self.ends.on_exits([(w.fd, 0) for w in watch.ready()])
            if not self.intake.reader.producers_alive():
                self.intake.drain(deadline)  # what they published as they died
                return
            time.sleep(0.01)  # a deadline loop on a condition: the producers' exits

    def remove_if_empty(self) -> None:
        # Nobody else will: the main process is gone. Keep a spool that still holds records.
        reader = self.intake.reader
        if not reader.unwritten():
            reader.close()
            remove_spool(self.cfg.runtime_dir)

    def final_counts(self) -> Tuple[int, int, int]:
        """(sent, dropped, diverted), with ``sent`` built from counts that each have one writer.

        Writers may still be diverting while this runs, and a process adds to its ``sent``
        before its ``diverted``: summing whole columns one after the other could see one and not
        the other. So each slot's sent is what it published (the last sequence number of its
        ring, from the producer's header or from what this listener committed) plus its dropped
        and diverted, read once. This also settles a writer killed between publishing and
        counting (in doubt).
        """
        from .._common.counters import S_DIVERTED, S_DROPPED, S_SEEN
        from .._common.spool import W_PUBLISHED
        c = self.counters
        rings = self.intake.reader.rings
        sent = dropped = diverted = 0
        for index in c.slot_indexes():
            slot = c.slot(index)
            d, v = slot.get(S_DROPPED), slot.get(S_DIVERTED)
            published = slot.get(S_SEEN)
            ring = rings.get(index)
            if ring is not None:
                published = max(published, ring.words[W_PUBLISHED], ring.done)
            sent += published + d + v
            dropped += d
            diverted += v
        return sent, dropped, diverted

    def finish(self, how: str, deadline: float) -> None:
        c = self.counters
        intake, ends = self.intake, self.ends
        intake.drain(deadline)
        ends.on_exits([(w.fd, 0) for w in ends.watch.ready()])  # ends seen before the stop
        # From now on writers divert to stderr. A writer that read the state just before this
        # may still publish: give it a moment, and take what it published. The main process
        # holds its own threads off its ring while it stops us (LogService.stop), so only
        # another live process of the service can be in that window: an idle service, or one
        # whose workers have ended, stops without the wait.
        c.set("state", STATE_STOPPED)
        ends.refresh()
        if ends.watch.by_slot or not self.control.owner_quiet:
            grace = time.monotonic() + 0.05
            while time.monotonic() < grace:
                time.sleep(0.005)  # a short bounded wait for in-flight writers, then a last look
        intake.drain(max(deadline, time.monotonic() + 0.5))
        ends.end_parked(force=True)  # a ring not written by the deadline stays in the spool
        intake.notice(self.summary(how), logging.INFO)
        if self.syslog is not None:
            self.syslog.close(min(2.0, max(0.2, deadline - time.monotonic())))
        intake.files.close()

    def summary(self, how: str) -> str:
        """The final counts, set in the counters, and the text of the last record."""
        c = self.counters
        sent, dropped, diverted = self.final_counts()
        written = c.get("written")
        diverted += c.get("stderr_records")
        settled = settle_accounts(sent, written, dropped, diverted, c.get("torn") + c.get("lost_listener"), 0)
        lost = settled["lost"]
        for key, value in (("final_written", written), ("final_sent", settled["sent"]),
                           ("final_dropped", dropped), ("final_diverted", diverted), ("final_lost", lost)):
            c.set(key, value)
        c.set("final_set", 1)
        summary = f"mplog {how}: {written} records written, {dropped} dropped, {lost} lost"
        if diverted:
            summary += f", {diverted} sent to stderr"
        recovered = c.get("recovered")
        if recovered:
            summary += f"; {recovered} recovered from a previous run"
        warned = sorted(self.intake.batch.warnings.items(), key=lambda kv: (-kv[1], kv[0]))
        if warned:
            summary += f"; {len(warned)} distinct warning(s):"
            for text, count in warned[:50]:
                summary += f"\n{count:>6} x {text}"
            if len(warned) > 50:
                summary += f"\n   ... and {len(warned) - 50} more"
        return summary
