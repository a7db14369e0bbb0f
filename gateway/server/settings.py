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
    # Envoy's stream_idle_timeout (5 min; Istio keeps it), in the HTTP/1.1 and HTTP/2
    # adapters (not HTTP/3 yet): a stream waiting on its client, for request body or
    # for the client to take response bytes, with no progress for this long ends: 408
    # (504 once the request is whole) before the response head, a reset after it;
    # flag SI. 0 turns it off.
    stream_idle_timeout_s: float = 300.0
    max_concurrent_streams: int = 100  # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS
    write_buffer_high_bytes: int = 256 * 1024  # pause the producer above this
    # HTTP/2 rapid reset guard (CVE-2023-44487): a connection whose client resets more
    # than this many unanswered streams within the window, and more than half of the
    # streams it opened there, is closed with GOAWAY ENHANCE_YOUR_CALM.
    # Resets count here whoever sends them: the client's RST_STREAM, and the server's
    # own reset of a stream the client broke (a frame after END_STREAM, a window
    # overflow: "MadeYouReset", CVE-2025-8671).
    # The HTTP/3 adapter applies the same guard (closing with H3_EXCESSIVE_LOAD), as
    # Envoy's connection manager does for every codec.
    h2_max_premature_resets: int = 200
    h2_reset_window_s: float = 10.0
    # HTTP/2 frame-flood guards, Envoy's http2_protocol_options with Envoy's defaults.
    # Going over any of them closes the connection with GOAWAY ENHANCE_YOUR_CALM.
    # DATA frames with no payload (padding aside) and no END_STREAM, in a row
    # (max_consecutive_inbound_frames_with_empty_payload; CVE-2019-9518):
    h2_max_consecutive_empty_frames: int = 1
    # PRIORITY frames, per stream the client opened, plus one stream's worth
    # (max_inbound_priority_frames_per_stream; CVE-2019-9513):
    h2_max_priority_frames_per_stream: int = 100
    # WINDOW_UPDATE frames: at most 5 + 2 * (streams opened + this * DATA frames
    # sent) (max_inbound_window_update_frames_per_data_frame_sent; CVE-2019-9511):
    h2_max_window_updates_per_data_frame: int = 10
    # Once an HTTP/2 connection is closing, how long its unsent bytes may go without
    # the client reading any of them before the socket is dropped (Envoy's
    # delayed_close_timeout): a client that never reads cannot keep a closed
    # connection, and the write buffer it filled, alive.
    h2_delayed_close_timeout_s: float = 1.0
    # HTTP/1.1 CONNECT (authority-form targets) is handed to the request handler as
    # a tunnel request; off, as on an ingress gateway, it is refused with 400.
    allow_connect: bool = False
