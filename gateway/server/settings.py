"""Limits and timeouts of the downstream protocol layer, with safe defaults.

Defaults follow Envoy where Envoy has one (60 KiB of request headers, 100 headers);
the others are chosen to stop abuse without getting in the way of ordinary traffic.
Every one is a setting (``meshgate run --help``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ServerSettings"]


@dataclass(frozen=True, slots=True)
class ServerSettings:
    max_request_header_bytes: int = 60 * 1024  # whole head; over it: 431
    max_request_headers: int = 100  # header count; over it: 431
    max_request_body_bytes: int = 1024 * 1024 * 1024  # 1 GiB; over it: 413
    request_header_timeout_s: float = 10.0  # slow-header (slowloris) guard: 408
    idle_timeout_s: float = 60.0  # keep-alive connection with no request
    max_concurrent_streams: int = 100  # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS
    write_buffer_high_bytes: int = 256 * 1024  # pause the producer above this
    # HTTP/2 rapid reset guard (CVE-2023-44487): a connection whose client resets more
    # than this many unanswered streams within the window, and more than half of the
    # streams it opened there, is closed with GOAWAY ENHANCE_YOUR_CALM.
    h2_max_premature_resets: int = 200
    h2_reset_window_s: float = 10.0
    # HTTP/1.1 CONNECT (authority-form targets) is handed to the request handler as
    # a tunnel request; off, as on an ingress gateway, it is refused with 400.
    allow_connect: bool = False
