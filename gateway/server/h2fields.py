"""The rules RFC 9113 §8.2 and §8.3 set for the header fields of a received HTTP/2 request
(and of its trailers), checked in one pass over the decoded block.

h2 can check the same rules itself (``validate_inbound_headers``), through a chain of
eight generators per block and a Python loop over every byte of every name and value;
on the HTTP/2 hot path that was about a tenth of the process's time. These functions
decide exactly as h2's checks do (``tests/unit/server/test_h2fields.py`` holds them to
it over generated blocks, with h2 itself as the oracle), at a fraction of the cost: two
regular-expression scans per field, done in C.

Each returns None for an acceptable block, or a short reason. Over HTTP/2 a malformed
request is answered 400 and then ends the connection (GOAWAY PROTOCOL_ERROR), as it
ended under h2's checks; over HTTP/3 it is a stream error.

``target_problem`` goes further than h2, as nghttp2 (Envoy's codec) does: the method,
path and authority become an HTTP/1.1 request line upstream, so a space or control
character in them is refused (HTTP/2 and HTTP/3 alike).
"""

from __future__ import annotations

import re

# A field name: no 0x00-0x20, no upper case, no 0x7f-0xff (§8.2.1).
_BAD_NAME = re.compile(rb"[\x00-\x20A-Z\x7f-\xff]").search
# A field value: no NUL, LF or CR anywhere (§8.2.1).
_BAD_VALUE = re.compile(rb"[\x00\n\r]").search
_EDGE_SPACE = (0x20, 0x09)  # nor SP or HTAB at either end
# Connection-specific fields have no place in HTTP/2 (§8.2.2).
_CONNECTION_FIELDS = frozenset(
    (b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade")
)
# The pseudo-header fields a request may carry (§8.3.1; :protocol from RFC 8441).
_REQUEST_PSEUDO = frozenset((b":method", b":scheme", b":authority", b":path", b":protocol"))
_COLON = 0x3A
# What goes into the HTTP/1.1 request line an upstream reads: a method is a token
# (RFC 9110 §5.6.2); a path or authority has no space, control character or DEL
# (bytes 0x80-0xff pass, as nghttp2 lets them). h2 does not check these; nghttp2
# (Envoy's codec) does.
_BAD_METHOD = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9A-Za-z]").search
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f]").search
# A :path also has no fragment ("#"; RFC 9113 8.3.1 and RFC 3986): kept, "/admin#x"
# would miss a rule written for "/admin" here and reach an upstream that reads
# "/admin". Envoy refuses it (CVE-2021-32779), and so does the HTTP/1.1 adapter.
_BAD_PATH = re.compile(rb"[\x00-\x20\x7f#]").search

Fields = list[tuple[bytes, bytes]]

# Fields whose characters have passed ``_field_problem``: a client repeats most of its
# fields request after request (method, scheme, authority, user-agent, cookies), and a
# field's verdict depends on its name and value alone. Bounded: once full, fields not
# in it are checked every time.
_CHECKED: set[tuple[bytes, bytes]] = set()
_CHECKED_MAX = 1024


def _field_problem(name: bytes, value: bytes) -> str | None:
    """What is wrong with one field's characters, or None."""
    if not name:
        return "empty field name"
    if _BAD_NAME(name) is not None or name.find(b":", 1) != -1:
        return f"invalid field name {name[:64]!r}"
    if value and (
        _BAD_VALUE(value) is not None or value[0] in _EDGE_SPACE or value[-1] in _EDGE_SPACE
    ):
        return f"invalid value of field {name[:64]!r}"
    if name in _CONNECTION_FIELDS:
        return f"connection-specific field {name!r}"
    if name == b"te" and value.lower() != b"trailers":
        return "te other than trailers"
    return None


def request_problem(fields: Fields) -> str | None:
    """Why a request header block is malformed, or None when it is acceptable."""
    seen: set[bytes] = set()
    regular = False
    method = authority = host = None
    checked = _CHECKED
    for field in fields:
        name, value = field
        if field not in checked:
            problem = _field_problem(name, value)
            if problem is not None:
                return problem
            if len(checked) < _CHECKED_MAX:
                checked.add((name, value))
        if name[0] == _COLON:
            if regular:
                return f"pseudo-header {name!r} after a regular field"
            if name in seen:
                return f"duplicate pseudo-header {name!r}"
            if name not in _REQUEST_PSEUDO:
                return f"pseudo-header {name[:64]!r} not allowed in a request"
            seen.add(name)
            if name == b":method":
                method = value
            elif name == b":authority":
                authority = value
            elif name == b":path" and not value:
                return "empty :path"
        else:
            regular = True
            if name == b"host":
                if host is not None:
                    return "more than one host field"
                host = value
    if method is None:
        return "no :method"
    connect = method == b"CONNECT"
    if connect and b":protocol" not in seen:
        # A plain CONNECT names only the authority (§8.5).
        if b":scheme" in seen or b":path" in seen:
            return "CONNECT with :scheme or :path"
    else:
        if b":scheme" not in seen or b":path" not in seen:
            return "no :scheme or no :path"
        if not connect and b":protocol" in seen:
            return ":protocol outside CONNECT"
    if authority is None and host is None:
        return "neither :authority nor host"
    if authority is not None and host is not None and authority != host:
        return ":authority and host differ"
    return None


def target_problem(method: bytes | None, path: bytes | None, authority: bytes | None) -> str | None:
    """Why the request line these pseudo-headers make is malformed, or None: the
    HTTP/2 and HTTP/3 adapters ask before a request goes further."""
    if method is not None and (not method or _BAD_METHOD(method) is not None):
        return "invalid :method"
    if path is not None and _BAD_PATH(path) is not None:
        return "invalid :path"
    if authority is not None and _BAD_TARGET(authority) is not None:
        return "invalid :authority"
    return None


def trailers_problem(fields: Fields) -> str | None:
    """Why a trailer block is malformed (no pseudo-headers there), or None."""
    for name, value in fields:
        problem = _field_problem(name, value)
        if problem is not None:
            return problem
        if name[0] == _COLON:
            return f"pseudo-header {name[:64]!r} in trailers"
    return None
