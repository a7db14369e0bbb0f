"""Small socket writes of a busy event-loop turn, gathered and sent together.

What it owns: deciding, for each small write a connection makes (a request head for
an upstream, a whole small response for a client), whether it goes to the transport
now or waits in the connection's own list until the end of the loop turn, and
calling every waiting connection's ``flush`` then, in the order they first waited;
and ``HeldWrites``, the ``write``/``flush`` pair both HTTP/1.1 connection classes use
(a write over ``BATCH_MAX_BYTES`` goes out at once, after what is held). The first
small write of a turn goes out at once; the ones after it in the same turn wait.
What it leaves to the connections: flushing before a close, a ``write_eof`` or a
hand-over of the transport, and dropping what is held on a reset.

Why: uvloop already sends the writes of one turn together, after every I/O callback
of that turn. Under load, holding the writes after the first one for one more turn
lets the next turn's events join them: fewer, larger bursts, so the receivers (the
upstream, the clients) are woken less often and the gateway itself finds more work
per wake-up. On the 2-core virtual machines meshgate is measured on, where waking a
sleeping process on the other core is expensive, that cut the gateway's CPU per
plain request by about a third (``docs/performance.md``, "Sends of a busy turn held
for one more turn"). A single request in flight is never held: its writes are the
first of their turn.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

__all__ = ["BATCH_MAX_BYTES", "Batched", "HeldWrites", "gather"]

# Writes up to this size may be held; a larger one (a body chunk) goes out at once,
# after what the connection holds, so back-pressure stays immediate.
BATCH_MAX_BYTES = 16 * 1024


class Batched(Protocol):
    """A connection that keeps held writes and sends them in ``flush``."""

    def flush(self) -> None: ...


# id(loop) -> (loop, connections holding writes): the turns in progress, one per loop
# (a process serves one loop; tests run many, one after another).
_turns: dict[int, tuple[asyncio.AbstractEventLoop, list[Batched]]] = {}


def gather(conn: Batched, loop: asyncio.AbstractEventLoop) -> bool:
    """For a connection about to make a small write with nothing held yet: False
    when it is the turn's first (write it now; this starts the turn), True when the
    turn already has one (hold it: ``conn.flush()`` is called at the end of the
    turn)."""
    turn = _turns.get(id(loop))
    if turn is None or turn[0] is not loop:
        _turns[id(loop)] = (loop, [])
        loop.call_soon(_end_turn, loop)
        return False
    turn[1].append(conn)
    return True


def _end_turn(loop: asyncio.AbstractEventLoop) -> None:
    turn = _turns.pop(id(loop), None)
    if turn is not None:
        for conn in turn[1]:
            conn.flush()


class HeldWrites:
    """``write`` and ``flush`` for a connection protocol with ``transport``,
    ``closed``, ``loop`` and ``_out`` (the held writes, None when there are none):
    the HTTP/1.1 downstream and upstream connections share them."""

    __slots__ = ()

    transport: Any
    closed: bool
    loop: asyncio.AbstractEventLoop
    _out: list[bytes] | None

    def write(self, data: bytes) -> None:
        """A small write that is not the first of its loop turn is held until the
        end of the turn; a large one goes out now, after what is held."""
        if self.closed or self.transport is None:
            return
        out = self._out
        if len(data) <= BATCH_MAX_BYTES:
            if out is not None:
                out.append(data)
                return
            if gather(self, self.loop):
                self._out = [data]
                return
        elif out is not None:
            self.flush()
        self.transport.write(data)

    def flush(self) -> None:
        """Hand the held writes to the transport, as one buffer."""
        out = self._out
        if out is None:
            return
        self._out = None
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            return
        transport.write(out[0] if len(out) == 1 else b"".join(out))
