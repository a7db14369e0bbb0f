"""``meshgate run``: load, compile, serve; workers, signals and the graceful stop.

    run(options)
      load_config + compile_snapshot   (every error printed, exit 1)
      workers == 1: one uvloop process serving the listeners and the admin API
      workers  > 1: the parent forks N workers (each binds with SO_REUSEPORT),
                    serves the admin API, forwards SIGTERM/SIGINT, and exits when
                    they have all exited

SIGTERM or SIGINT: stop accepting, let requests in flight finish (bounded by
``drain_timeout_s``), exit 0. The current Snapshot is held in a ``SnapshotRef`` that a
reload will swap by reference; a request reads it once and keeps its snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from .routing.table import Snapshot
from .server.settings import ServerSettings

__all__ = ["RunOptions", "SnapshotRef", "run"]


@dataclass(frozen=True)
class RunOptions:
    paths: tuple[str, ...]
    address: str = "127.0.0.1"
    admin_port: int = 15000
    labels: Mapping[str, str] = field(default_factory=lambda: {"istio": "ingressgateway"})
    gateway_class: str = "meshgate"
    workers: int = 1
    log_format: str = "json"
    settings: ServerSettings = field(default_factory=ServerSettings)
    drain_timeout_s: float = 5.0


class SnapshotRef:
    """The one mutable cell of the data plane: the Snapshot new requests get."""

    __slots__ = ("current",)

    def __init__(self, snapshot: Snapshot | None = None) -> None:
        self.current = snapshot


def _say(message: str) -> None:
    print(f"meshgate: {message}", file=sys.stderr, flush=True)


def load_snapshot(options: RunOptions) -> Snapshot | None:
    """Load and compile; prints every problem and returns None when invalid."""
    from .config import ConfigErrors
    from .config.load import load_config
    from .routing.compile import compile_snapshot

    try:
        model = load_config(list(options.paths))
    except ConfigErrors as exc:
        for warning in exc.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        for error in exc.errors:
            print(f"error: {error}", file=sys.stderr)
        print(exc.summary(), file=sys.stderr, flush=True)
        return None
    for warning in model.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return compile_snapshot(model, dict(options.labels))


def run(options: RunOptions) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code."""
    snapshot = load_snapshot(options)
    if snapshot is None:
        return 1
    from .server.listeners import partition_listeners

    served, skipped = partition_listeners(snapshot.listeners.values())
    for listener in skipped:
        _say(
            f"skipping {listener.protocol} listener on port {listener.port}: "
            "TLS listeners are not served by this version"
        )
    ports = sorted(listener.port for listener in served)
    if options.workers <= 1:
        import uvloop

        return uvloop.run(_serve_worker(options, snapshot, ports, admin=True, ready_fd=None))
    return _supervise(options, snapshot, ports)


async def _serve_worker(
    options: RunOptions,
    snapshot: Snapshot,
    ports: list[int],
    *,
    admin: bool,
    ready_fd: int | None,
) -> int:
    from .admin import Readiness, serve_admin
    from .pipeline import Pipeline
    from .server.listeners import ListenerSet
    from .telemetry import AccessLog
    from .upstream.pool import UpstreamPools

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    settings = options.settings
    access_log = AccessLog(options.log_format)
    pools = UpstreamPools(write_buffer_high_bytes=settings.write_buffer_high_bytes)
    pipeline = Pipeline(SnapshotRef(snapshot), pools, access_log)
    listeners = ListenerSet(pipeline.handle, settings, options.address)
    readiness = Readiness(snapshot_version=snapshot.version)
    admin_stop = asyncio.Event()
    admin_task = None
    if admin:
        admin_task = loop.create_task(serve_admin(readiness, options.admin_port, admin_stop))
    try:
        await listeners.start(ports)
    except OSError as exc:
        _say(f"cannot bind {options.address}: {exc}")
        admin_stop.set()
        if admin_task is not None:
            await admin_task
        return 1
    readiness.listeners_up = True
    if ready_fd is not None:
        os.write(ready_fd, b"1")
        os.close(ready_fd)
    else:
        where = ", ".join(str(p) for p in ports) or "none"
        admin_text = f"; admin on 127.0.0.1:{options.admin_port}" if admin else ""
        _say(f"serving HTTP on {options.address} ports {where}{admin_text}")
    await stop.wait()
    readiness.draining = True
    await listeners.stop(options.drain_timeout_s)
    pools.close()
    access_log.flush()
    admin_stop.set()
    if admin_task is not None:
        with contextlib.suppress(Exception):
            await admin_task
    return 0


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker if the supervising parent dies, so that a
    killed parent never leaves workers holding the ports."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _supervise(options: RunOptions, snapshot: Snapshot, ports: list[int]) -> int:
    """Fork the workers, serve the admin API, relay signals, reap children."""
    import uvloop

    ready_read, ready_write = os.pipe()
    children: list[int] = []
    for _ in range(options.workers):
        pid = os.fork()
        if pid == 0:
            os.close(ready_read)
            _die_with_parent()
            code = 1
            try:
                code = uvloop.run(
                    _serve_worker(options, snapshot, ports, admin=False, ready_fd=ready_write)
                )
            finally:
                sys.stdout.flush()
                os._exit(code)
        children.append(pid)
    os.close(ready_write)
    return uvloop.run(_parent(options, snapshot, ports, children, ready_read))


async def _parent(
    options: RunOptions, snapshot: Snapshot, ports: list[int], children: list[int], ready_fd: int
) -> int:
    from .admin import Readiness, serve_admin

    loop = asyncio.get_running_loop()
    readiness = Readiness(snapshot_version=snapshot.version)
    admin_stop = asyncio.Event()
    admin_task = loop.create_task(serve_admin(readiness, options.admin_port, admin_stop))
    alive = set(children)
    codes: list[int] = []
    all_exited = asyncio.Event()
    ready_count = 0

    def on_ready() -> None:
        nonlocal ready_count
        data = os.read(ready_fd, 64)
        ready_count += len(data)
        if not data or ready_count >= len(children):
            loop.remove_reader(ready_fd)
            if ready_count >= len(children):
                readiness.listeners_up = True
                where = ", ".join(str(p) for p in ports) or "none"
                _say(
                    f"serving HTTP on {options.address} ports {where} with "
                    f"{len(children)} workers; admin on 127.0.0.1:{options.admin_port}"
                )

    def forward(signum: int) -> None:
        readiness.draining = True
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    loop.add_reader(ready_fd, on_ready)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, forward, signum)

    async def watch(pid: int) -> None:
        # uvloop keeps SIGCHLD for itself, so each child is waited for in a thread.
        _, status = await loop.run_in_executor(None, os.waitpid, pid, 0)
        alive.discard(pid)
        codes.append(os.waitstatus_to_exitcode(status))
        if not readiness.draining:
            # A worker died on its own: stop the others rather than limp on.
            forward(signal.SIGTERM)
        if not alive:
            all_exited.set()

    watchers = [loop.create_task(watch(pid)) for pid in children]
    await all_exited.wait()
    await asyncio.gather(*watchers)
    admin_stop.set()
    with contextlib.suppress(Exception):
        await admin_task
    with contextlib.suppress(OSError):
        os.close(ready_fd)
    return 0 if all(code == 0 for code in codes) else 1
