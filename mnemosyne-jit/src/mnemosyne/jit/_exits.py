"""When each child process exited: the detection delay of a death that nobody announced.

An injected fault writes a fault event before it fires, so the recovery summary knows
when the fault happened. An external ``kill -9`` or the OOM killer writes nothing, and
the agent only sees the exit when its supervision loop next polls: without the moment of
death, the detect phase would read 0. :class:`ExitClock` gives each child a thread that
blocks on a pidfd (Linux 5.3; else ``waitid(WNOWAIT)``) -- woken by the kernel the moment
the child exits, without reaping it (``Popen.poll`` still does that) -- and stamps the
wall-clock time. On a loaded host the thread may run a few milliseconds late, so the
detect phase of such a death is, if anything, under-estimated.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time

__all__ = ["EXIT_CLOCK", "ExitClock"]


class ExitClock:
    """Wall-clock exit times of watched child processes."""

    def __init__(self) -> None:
        self._times: dict[int, float] = {}
        self._threads: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()

    def watch(self, pid: int) -> None:
        """Start timing the exit of child ``pid`` (a daemon thread, gone when the child is)."""
        try:  # opened here, before anyone can reap the child
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # no pidfd (old kernel or Python)
            fd = -1
        t = threading.Thread(target=self._wait, args=(pid, fd), name=f"mnemo-exit-{pid}", daemon=True)
        with self._lock:
            self._threads[pid] = t
        t.start()

    def _wait(self, pid: int, fd: int) -> None:
        try:
            if fd >= 0:
                waiter = select.poll()
                waiter.register(fd, select.POLLIN)
                waiter.poll()  # readable once the process exited, reaped or not
            else:
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        except OSError:  # already reaped (ChildProcessError), or not our child
            return
        finally:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        with self._lock:
            self._times[pid] = time.time()

    def exited_at(self, pid: int) -> float | None:
        """When ``pid`` exited (``time.time()``), or None when it was not timed; forgets it.

        Call it once the exit was seen (``Popen.poll``): it gives the watcher a moment to
        stamp the time if the poll won the race.
        """
        with self._lock:
            t = self._threads.pop(pid, None)
        if t is not None:
            t.join(0.05)
        with self._lock:
            return self._times.pop(pid, None)


#: The agent's clock (one per process: its children).
EXIT_CLOCK = ExitClock()
