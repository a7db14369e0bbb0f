"""``gateway.memory.tune_malloc``: with the threshold fixed, a 256 KiB block (uvloop's
TLS read buffer) still gets its own mapping after one such block has been freed;
with glibc's dynamic default the second one comes from the heap.

Each case runs in a fresh interpreter, so that neither the test process's malloc
state nor its settings leak in or out."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from gateway.memory import tune_malloc

_PROBE = textwrap.dedent(
    """
    import ctypes, sys
    from gateway.memory import tune_malloc

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
            "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = MallInfo2
    problem = tune_malloc(int(sys.argv[1]))
    assert problem is None, problem
    size = 256 * 1024
    libc.free(libc.malloc(size))  # raises glibc's dynamic threshold, if it is on
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(size)
    print(libc.mallinfo2().hblkhd - before >= size)
    libc.free(block)
    """
)


def _second_block_is_mapped(threshold: int) -> bool:
    env = {"PATH": "/usr/bin:/bin"}  # no MALLOC_* settings from the caller
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(threshold)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return out.stdout.strip() == "True"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_fixed_threshold_keeps_large_blocks_out_of_the_heap() -> None:
    assert _second_block_is_mapped(128 * 1024)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_glibc_default_moves_the_second_large_block_into_the_heap() -> None:
    assert not _second_block_is_mapped(0)


def test_the_gateway_leaves_glibcs_dynamic_threshold_by_default() -> None:
    # A fixed threshold maps every large socket read: bulk transfers cost ~3x the CPU.
    from gateway.cli import _build_parser
    from gateway.runtime import RunOptions

    assert _build_parser().parse_args(["run", "x"]).malloc_mmap_threshold == 0
    assert RunOptions(paths=()).malloc_mmap_threshold == 0


def test_a_threshold_over_glibcs_maximum_is_refused_with_a_reason() -> None:
    problem = tune_malloc(64 * 1024 * 1024)
    assert problem is not None and "maximum" in problem


def test_sweeper_runs_once_quiet_and_at_most_once_per_interval() -> None:
    import asyncio

    from gateway.memory import MemorySweeper

    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        runs: list[float] = []
        swept = asyncio.Event()

        def release() -> None:
            runs.append(loop.time())
            swept.set()

        sweeper = MemorySweeper(min_interval_s=0.3, release=release, clock=loop.time)
        quiet = True
        sweeper.idle(lambda: quiet)
        await swept.wait()  # at once: no sweep has run yet
        swept.clear()
        sweeper.idle(lambda: quiet)  # within the interval: waits for it
        await swept.wait()
        # Busy again by the time the sweep is due: nothing runs.
        quiet = False
        sweeper.idle(lambda: quiet)
        assert sweeper._pending is not None
        due = asyncio.Event()
        loop.call_at(sweeper._pending.when(), due.set)
        await due.wait()
        await asyncio.sleep(0)  # the sweep's own callback, scheduled for the same time
        assert sweeper._pending is None
        return runs

    runs = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert len(runs) == 2
    assert runs[1] - runs[0] >= 0.3 - 1e-3


def test_no_sweep_while_another_watched_listener_is_serving() -> None:
    import asyncio

    from gateway.memory import MemorySweeper

    async def scenario() -> int:
        loop = asyncio.get_running_loop()
        runs: list[float] = []
        sweeper = MemorySweeper(min_interval_s=0, release=lambda: runs.append(1.0))
        state = {"tcp": True, "quic": False}  # HTTP/3 still has a connection

        def tcp_quiet() -> bool:
            return state["tcp"]

        def quic_quiet() -> bool:
            return state["quic"]

        sweeper.watch(tcp_quiet)
        sweeper.watch(quic_quiet)

        async def due() -> None:
            assert sweeper._pending is not None
            reached = asyncio.Event()
            loop.call_at(sweeper._pending.when(), reached.set)
            await reached.wait()
            await asyncio.sleep(0)  # the sweep's callback, scheduled for the same time

        sweeper.idle(tcp_quiet)
        await due()
        assert runs == []  # the QUIC listener is busy: the process must not pause
        state["quic"] = True
        sweeper.idle(quic_quiet)
        await due()
        assert len(runs) == 1
        # A stopped listener (busy for good) no longer holds sweeps back.
        state["quic"] = False
        sweeper.forget(quic_quiet)
        sweeper.idle(tcp_quiet)
        await due()
        return len(runs)

    assert asyncio.run(asyncio.wait_for(scenario(), 10)) == 2
