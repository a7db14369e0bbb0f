"""Hot reload: notice configuration changes, rebuild the Snapshot beside the running
one, and swap the one reference new requests read.

What it owns: watching the configuration paths (polling ``stat`` of every YAML file
they name, plus the set of files itself, on a short interval — no inotify
dependency, and it sees files added to or removed from a directory), reloading on
request (SIGHUP), the rules of a reload, and the record of what happened for the
log and the admin API. What it leaves to others: how a Snapshot is built (the
``build`` callable: load, validate, compile), and what else must follow a new
Snapshot (the ``on_applied`` callbacks: listeners to bind or close, JWKS to fetch).

The rules of a reload:

- build in a worker thread, so requests keep flowing while YAML is parsed;
- invalid configuration: keep the running Snapshot, log every error (with
  ``file:line``) and keep them for ``/config_dump`` until a later reload succeeds;
- a result with the same ``Snapshot.version`` (the content hash) as the running one
  changes nothing at all: no swap, no callback;
- otherwise swap ``SnapshotRef.current`` in one assignment. Requests in flight keep
  the Snapshot they started with; connections are never closed by a reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .config.errors import ConfigErrors, Model
from .config.load import find_config_files
from .routing.table import Snapshot

__all__ = ["ReloadStatus", "Reloader", "config_fingerprint"]

Build = Callable[[], tuple[Model, Snapshot]]
OnApplied = Callable[[Snapshot, Snapshot], Awaitable[list[str]]]


class _Ref(Protocol):
    current: Snapshot | None


def config_fingerprint(paths: Sequence[str]) -> tuple[Any, ...]:
    """What a change is judged by: the file list, and each file's identity, size and
    mtime. A file replaced by rename (how editors and Kubernetes ConfigMap mounts
    update files) gets a new inode, so even a same-second, same-size edit shows."""
    files, errors, _ = find_config_files(paths)
    marks: list[Any] = [tuple(str(e) for e in errors)]
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            marks.append((path, None))
            continue
        marks.append((path, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(marks)


@dataclass
class ReloadStatus:
    """What the admin API shows about reloads."""

    version: str | None = None
    attempts: int = 0
    applied: int = 0
    unchanged: int = 0
    rejected: int = 0
    last_result: str = "initial"  # initial | applied | unchanged | rejected
    last_reason: str = ""
    last_attempt_unix: float | None = None
    last_applied_unix: float | None = None
    # The errors of the most recent rejected reload (each "file:line: Kind ns/name:
    # path: message"); cleared when a later reload is applied or found unchanged.
    errors: list[str] = field(default_factory=list)
    last_rejected_unix: float | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "attempts": self.attempts,
            "applied": self.applied,
            "unchanged": self.unchanged,
            "rejected": self.rejected,
            "lastResult": self.last_result,
            "lastReason": self.last_reason,
            "lastAttemptUnix": self.last_attempt_unix,
            "lastAppliedUnix": self.last_applied_unix,
            "lastRejectedUnix": self.last_rejected_unix,
            "errors": list(self.errors),
            "warnings": list(self.warnings),
        }


def _say(message: str) -> None:
    # One write of the whole line: workers share stderr, and print() writes the text
    # and its newline separately, so two workers' lines could run into one.
    sys.stderr.write(f"meshgate: {message}\n")
    sys.stderr.flush()


class Reloader:
    """Owns the reload of one process's Snapshot."""

    def __init__(
        self,
        paths: Sequence[str],
        build: Build,
        ref: _Ref,
        model: Model,
        *,
        interval_s: float = 1.0,
        on_applied: Sequence[OnApplied] = (),
        log: Callable[[str], None] = _say,
    ) -> None:
        self.paths = list(paths)
        self.build = build
        self.ref = ref
        self.model = model
        self.interval_s = interval_s
        self.on_applied = list(on_applied)
        self.log = log
        current = ref.current
        self.status = ReloadStatus(version=current.version if current else None)
        self.status.warnings = [str(w) for w in model.warnings]
        self._fingerprint = config_fingerprint(self.paths)
        self._requested = asyncio.Event()
        self._lock = asyncio.Lock()

    def request(self) -> None:
        """Ask for a reload now (SIGHUP); safe to call from a signal handler."""
        self._requested.set()

    async def reload(self, reason: str) -> str:
        """One reload; returns ``applied``, ``unchanged`` or ``rejected``."""
        async with self._lock:
            return await self._reload(reason)

    async def _reload(self, reason: str) -> str:
        status = self.status
        status.attempts += 1
        number = status.attempts
        status.last_reason = reason
        status.last_attempt_unix = time.time()
        # Taken before building: a change made while building is seen next round.
        self._fingerprint = config_fingerprint(self.paths)
        loop = asyncio.get_running_loop()
        try:
            model, snapshot = await loop.run_in_executor(None, self.build)
        except ConfigErrors as exc:
            status.rejected += 1
            status.last_result = "rejected"
            status.last_rejected_unix = status.last_attempt_unix
            status.errors = [str(e) for e in exc.errors]
            self.log(
                f"reload #{number} ({reason}) rejected, keeping version {status.version}: "
                f"{exc.summary()}"
            )
            for error in exc.errors:
                self.log(f"reload #{number} error: {error}")
            return "rejected"
        except Exception as exc:  # a bug in the compiler must not take the gateway down
            status.rejected += 1
            status.last_result = "rejected"
            status.last_rejected_unix = status.last_attempt_unix
            status.errors = [f"internal error while compiling: {exc!r}"]
            self.log(
                f"reload #{number} ({reason}) failed, keeping version {status.version}: {exc!r}"
            )
            return "rejected"
        status.errors = []
        status.warnings = [str(w) for w in model.warnings]
        old = self.ref.current
        if old is not None and old.version == snapshot.version:
            status.unchanged += 1
            status.last_result = "unchanged"
            self.log(f"reload #{number} ({reason}) unchanged, version {snapshot.version}")
            return "unchanged"
        self.ref.current = snapshot  # the swap: one reference, atomic for every reader
        self.model = model
        status.applied += 1
        status.last_result = "applied"
        status.last_applied_unix = time.time()
        status.version = snapshot.version
        problems: list[str] = []
        if old is not None:
            for callback in self.on_applied:
                try:
                    problems.extend(await callback(old, snapshot))
                except Exception as exc:
                    problems.append(f"after reload: {exc!r}")
        status.errors = problems
        self.log(
            f"reload #{number} ({reason}) applied version {snapshot.version}"
            f" (was {old.version if old else None})"
        )
        for problem in problems:
            self.log(f"reload #{number} problem: {problem}")
        return "applied"

    async def watch(self, stop: asyncio.Event) -> None:
        """Poll for file changes (and wait for ``request()``) until ``stop`` is set."""
        interval = self.interval_s if self.interval_s > 0 else None
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                requested = asyncio.ensure_future(self._requested.wait())
                await asyncio.wait(
                    {stopping, requested},
                    timeout=interval,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not requested.done():
                    requested.cancel()
                if stop.is_set():
                    break
                if self._requested.is_set():
                    self._requested.clear()
                    await self.reload("SIGHUP")
                    continue
                if interval is None:
                    continue
                # stat() of a few files: cheap enough to run on the event loop.
                if config_fingerprint(self.paths) != self._fingerprint:
                    await self.reload("file change")
        finally:
            stopping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stopping
