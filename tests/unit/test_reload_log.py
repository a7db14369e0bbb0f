"""The reload log line reaches stderr in one write, so workers' lines never merge."""

from __future__ import annotations

import io
import sys

import pytest

from gateway import reload


class _Writes(io.RawIOBase):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[no-untyped-def, override]
        self.chunks.append(bytes(data))
        return len(data)


def test_each_line_is_one_write_to_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _Writes()
    # The shape of Python's own stderr when it is a pipe: no buffer, written through.
    stream = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
    monkeypatch.setattr(sys, "stderr", stream)
    reload._say("reload #1 (SIGHUP) applied version a (was b)")
    reload._say("reload #2 (file change) unchanged, version a")
    assert raw.chunks == [
        b"meshgate: reload #1 (SIGHUP) applied version a (was b)\n",
        b"meshgate: reload #2 (file change) unchanged, version a\n",
    ]
