"""glibc malloc settings made at start-up, through ctypes (docs/performance.md, memory).

Every TLS connection on uvloop owns a 256 KiB read buffer, allocated with ``malloc``
when the connection is made and freed when it closes. glibc serves blocks that large
with ``mmap`` at first, but its *dynamic* threshold rises to the size of the first
such block freed: from then on every 256 KiB buffer is carved out of the main heap,
the heap's pages stay resident once a buffer has used them, and live buffers
scattered through the heap keep it from shrinking. Under a stream of TLS connections
that is most of the worker's growth.

``tune_malloc`` fixes the threshold (``mallopt(M_MMAP_THRESHOLD)``, which also turns
the dynamic adjustment off): a block of that size or more gets its own mapping, only
the pages actually written count as resident, and ``free`` returns it to the system
at once. Blocks under the threshold (every Python object, OpenSSL's per-connection
state) still come from the heap.

It is off by default (``--malloc-mmap-threshold 0``). A fixed threshold under 256 KiB
also maps every large ``bytes`` the event loop makes for a big socket read: a 1 GB
download through the gateway then took 2.9 times the CPU (1.5 to 1.7 s against
0.51 to 0.60 s, 620 against 1,400 MB/s) for 3 MB less RSS after the TLS loads. An
operator whose gateway serves many short TLS connections and no bulk transfers may
still want 131072.

Not glibc (musl, macOS): nothing is changed and ``tune_malloc`` says so.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import os
import time
from collections.abc import Callable

__all__ = [
    "DEFAULT_MMAP_THRESHOLD_BYTES",
    "SWEEPER",
    "MemorySweeper",
    "release_memory",
    "tune_malloc",
]

# 0: glibc's dynamic threshold (see the module docstring for why). The value to ask
# for instead is 128 KiB: under uvloop's 256 KiB TLS buffer, over the small and
# medium blocks that make up nearly everything else.
DEFAULT_MMAP_THRESHOLD_BYTES = 0

_M_MMAP_THRESHOLD = -3  # <malloc.h>
# glibc's ceiling for M_MMAP_THRESHOLD on 64-bit builds (HEAP_MAX_SIZE / 2).
_MAX_MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def tune_malloc(mmap_threshold_bytes: int = DEFAULT_MMAP_THRESHOLD_BYTES) -> str | None:
    """Fix glibc's mmap threshold at ``mmap_threshold_bytes``; 0 leaves glibc's
    dynamic default. Returns None when applied (or nothing was asked), else why not.

    ``MALLOC_MMAP_THRESHOLD_`` in the environment wins: whoever set it chose."""
    if mmap_threshold_bytes <= 0 or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return None
    if mmap_threshold_bytes > _MAX_MMAP_THRESHOLD_BYTES:
        return f"mmap threshold {mmap_threshold_bytes} is over glibc's maximum (32 MiB)"
    libc = _libc()
    if libc is None:
        return "not glibc: malloc settings left as they are"
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    if libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold_bytes) != 1:
        return f"mallopt(M_MMAP_THRESHOLD, {mmap_threshold_bytes}) was refused"
    return None


def release_memory() -> int:
    """Collect reference cycles now and give the malloc heap's free pages back to the
    system (``malloc_trim``; glibc only). For moments when the worker has just gone
    quiet, so that the next burst reuses this memory rather than growing past it.
    Returns the number of objects the collection freed."""
    freed = gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim(0)
    return freed


class MemorySweeper:
    """Runs ``release_memory`` when a listener goes quiet, at most once per interval.

    A listener calls ``watch(still_idle)`` when it starts, ``forget(still_idle)`` when
    it stops, and ``idle(still_idle, delay_s)`` when its last connection has gone. The
    sweep runs ``delay_s`` later (or once ``min_interval_s`` has passed since the
    previous one) if every watched listener, and the one that asked, is idle then: a
    collection pauses the whole process, so it never runs while another listener
    (HTTP/3 beside HTTP/1.1 and HTTP/2, say) is serving. A collection walks only
    what ``gc.freeze()`` has not frozen, a few ms on a quiet worker; the interval
    bounds it when connections come and go one at a time. Memory is process-wide,
    so is the sweeper (``SWEEPER``)."""

    def __init__(
        self,
        min_interval_s: float = 5.0,
        release: Callable[[], object] = release_memory,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_interval_s = min_interval_s
        self.release = release
        self.clock = clock
        self.sweeps = 0
        self._last = float("-inf")
        self._pending: asyncio.TimerHandle | None = None
        self._pending_loop: asyncio.AbstractEventLoop | None = None
        self._checks: list[Callable[[], bool]] = []
        self._watched: list[Callable[[], bool]] = []

    def watch(self, still_idle: Callable[[], bool]) -> None:
        """Count a listener in: no sweep while its ``still_idle()`` is false."""
        if still_idle not in self._watched:
            self._watched.append(still_idle)

    def forget(self, still_idle: Callable[[], bool]) -> None:
        """A stopped listener no longer holds sweeps back."""
        if still_idle in self._watched:
            self._watched.remove(still_idle)

    def idle(self, still_idle: Callable[[], bool], delay_s: float = 0.0) -> None:
        loop = asyncio.get_running_loop()
        if self._pending is not None and self._pending_loop is not loop:
            self.cancel()  # left by another event loop (tests run several)
        if still_idle not in self._checks:
            self._checks.append(still_idle)
        if self._pending is not None:
            return
        wait = max(delay_s, self._last + self.min_interval_s - self.clock())
        self._pending = loop.call_later(wait, self._sweep)
        self._pending_loop = loop

    def _sweep(self) -> None:
        self._pending = self._pending_loop = None
        checks, self._checks = self._checks, []
        checks += [check for check in self._watched if check not in checks]
        if checks and all(check() for check in checks):
            self._last = self.clock()
            self.sweeps += 1
            self.release()

    def cancel(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        self._pending = self._pending_loop = None
        self._checks = []


SWEEPER = MemorySweeper()
