"""Request errors: one small class per reason, turned into a response in one place.

The data plane raises these from stages, the upstream client and the protocol
adapters; ``respond_to`` is the only code that turns one into a status, headers and
a short body. Each carries an Envoy-style response flag for the access log.

    GatewayError                      source, status, flag, body
    ├── RouteNotFound                 404 NR   no virtual host or route matched
    ├── BadRequest                    400 DPE  malformed or ambiguous request framing
    ├── HeadersTooLarge               431      head over the byte or count limit
    ├── BodyTooLarge                  413      body over max_request_body_bytes
    ├── RequestHeaderTimeout          408      head not complete in time
    ├── StreamIdleTimeout             408 SI   stalled on the client (504 if the request was whole)
    ├── Unauthenticated               401 JWT  a token was present and is not valid
    ├── AccessDenied                  403 RBAC an AuthorizationPolicy denied the request
    ├── RateLimited                   429 RL   a rate limit refused the request
    ├── RateLimitServiceError         503 RLSE a fail-closed limit's Redis did not answer
    ├── DownstreamDisconnected        (none) DC the client went away mid-exchange
    ├── NoHealthyUpstream             503 UH   no cluster or no endpoints
    ├── ClusterNotFound               500 NC   a Gateway API backendRef that cannot be used
    ├── UpstreamConnectFailure        503 UF   connect refused / timed out
    ├── UpstreamTimeout               504 UT   route timeout before the response head
    ├── UpstreamReset                 503 UR   upstream closed/reset before the head
    ├── UpstreamOverflow              503 UO   a DestinationRule connectionPool limit is full
    ├── UpstreamProtocolError         502 UPE  upstream answered something unparsable
    └── InternalError                 500      anything unmapped (never shown in detail)

Foreign exceptions (httptools, OSError) are translated into these at the module that
sees them, with ``raise ... from exc``.
"""

from __future__ import annotations

import enum

from .server.events import ResponseHead

__all__ = [
    "AccessDenied",
    "BadRequest",
    "BodyTooLarge",
    "ClusterNotFound",
    "DownstreamDisconnected",
    "ErrorSource",
    "GatewayError",
    "HeadersTooLarge",
    "InternalError",
    "NoHealthyUpstream",
    "RateLimitServiceError",
    "RateLimited",
    "RequestHeaderTimeout",
    "RouteNotFound",
    "StreamIdleTimeout",
    "Unauthenticated",
    "UpstreamConnectFailure",
    "UpstreamOverflow",
    "UpstreamProtocolError",
    "UpstreamReset",
    "UpstreamTimeout",
    "respond_to",
]


class ErrorSource(enum.Enum):
    DOWNSTREAM = "downstream"
    UPSTREAM = "upstream"
    INTERNAL = "internal"


class GatewayError(Exception):
    """Base of every request error. Class attributes give the defaults."""

    status: int = 500
    flag: str = ""  # Envoy response flag; "" when the condition has none
    source: ErrorSource = ErrorSource.INTERNAL
    body: str = ""  # short plain-text body; "" for an empty body
    retryable: bool = False
    # Extra response headers (e.g. www-authenticate); an instance may set its own.
    headers: tuple[tuple[str, str], ...] = ()

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.body or type(self).__name__)
        self.detail = detail


class RouteNotFound(GatewayError):
    status = 404
    flag = "NR"
    source = ErrorSource.DOWNSTREAM


class BadRequest(GatewayError):
    status = 400
    flag = "DPE"
    source = ErrorSource.DOWNSTREAM
    body = "bad request"


class HeadersTooLarge(GatewayError):
    status = 431
    flag = "DPE"
    source = ErrorSource.DOWNSTREAM
    body = "request header fields too large"


class BodyTooLarge(GatewayError):
    status = 413
    flag = "DPE"
    source = ErrorSource.DOWNSTREAM
    body = "payload too large"


class RequestHeaderTimeout(GatewayError):
    status = 408
    flag = "DPE"
    source = ErrorSource.DOWNSTREAM
    body = "request timeout"


class StreamIdleTimeout(GatewayError):
    """Envoy's ``stream_idle_timeout``: the stream waited on its client (a request body
    that stopped coming, a response the client stopped taking) for
    ``stream_idle_timeout_s``. As Envoy's ``maybeRequestTimeoutCode``: 408 while the
    request is incomplete, 504 once it was received whole; after the response head,
    the stream is reset instead."""

    status = 408
    flag = "SI"
    source = ErrorSource.DOWNSTREAM
    body = "stream timeout"

    def __init__(self, detail: str = "", request_complete: bool = False) -> None:
        super().__init__(detail)
        if request_complete:
            self.status = 504


class Unauthenticated(GatewayError):
    """A JWT was presented and failed verification (a missing token is not this)."""

    status = 401
    # Envoy records jwt_authn denials only in its response code details; meshgate
    # has a flag for them so the access log tells them from an upstream's 401.
    flag = "JWT"
    source = ErrorSource.DOWNSTREAM
    body = "Jwt verification fails"

    def __init__(self, detail: str = "", *, realm: str = "") -> None:
        super().__init__(detail)
        # RFC 6750: tell the client which scheme, and that the token was the problem.
        self.headers = (("www-authenticate", f'Bearer realm="{realm}", error="invalid_token"'),)


class AccessDenied(GatewayError):
    """An AuthorizationPolicy (DENY, or no matching ALLOW) refused the request."""

    status = 403
    flag = "RBAC"
    source = ErrorSource.DOWNSTREAM
    body = "RBAC: access denied"


class RateLimited(GatewayError):
    """Over a RateLimitPolicy limit; ``headers`` carry ``retry-after`` and the
    ratelimit-* figures."""

    status = 429
    flag = "RL"
    source = ErrorSource.DOWNSTREAM
    body = "rate limited"

    def __init__(self, detail: str = "", headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(detail)
        self.headers = headers


class RateLimitServiceError(GatewayError):
    """A limit with ``failureMode: closed`` could not reach its Redis: refuse rather
    than serve unlimited (Envoy's ``failure_mode_deny``)."""

    status = 503
    flag = "RLSE"
    source = ErrorSource.INTERNAL
    body = "rate limit service unavailable"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail)
        self.headers = (("retry-after", "1"),)


class DownstreamDisconnected(GatewayError):
    """The client closed or reset the connection; nothing can be answered."""

    status = 499  # nginx's convention; only ever shown in the access log
    flag = "DC"
    source = ErrorSource.DOWNSTREAM


class NoHealthyUpstream(GatewayError):
    status = 503
    flag = "UH"
    source = ErrorSource.UPSTREAM
    body = "no healthy upstream"


class ClusterNotFound(GatewayError):
    """A Gateway API route sent the request to a backend that cannot be used (missing
    Service, unsupported kind, reference not permitted, no backends): the spec asks
    for a 500, which Envoy gives with ``cluster_not_found_response_code``."""

    status = 500
    flag = "NC"
    source = ErrorSource.INTERNAL
    body = "invalid backend"


class UpstreamConnectFailure(GatewayError):
    status = 503
    flag = "UF"
    source = ErrorSource.UPSTREAM
    body = (
        "upstream connect error or disconnect/reset before headers. "
        "reset reason: connection failure"
    )
    retryable = True


class UpstreamTimeout(GatewayError):
    status = 504
    flag = "UT"
    source = ErrorSource.UPSTREAM
    body = "upstream request timeout"


class UpstreamReset(GatewayError):
    status = 503
    flag = "UR"
    source = ErrorSource.UPSTREAM
    body = (
        "upstream connect error or disconnect/reset before headers. "
        "reset reason: connection termination"
    )


class UpstreamOverflow(GatewayError):
    """A circuit breaker (DestinationRule ``connectionPool``) is full: too many
    pending or active requests for the cluster."""

    status = 503
    flag = "UO"
    source = ErrorSource.UPSTREAM
    body = "upstream connect error or disconnect/reset before headers. reset reason: overflow"


class UpstreamProtocolError(GatewayError):
    status = 502
    flag = "UPE"
    source = ErrorSource.UPSTREAM
    body = "upstream sent an invalid response"


class InternalError(GatewayError):
    status = 500
    source = ErrorSource.INTERNAL
    body = "internal error"


_TEXT = ("content-type", "text/plain")


def respond_to(error: GatewayError) -> tuple[ResponseHead, bytes]:
    """The response for ``error``: its status, a short plain-text body.

    Only the class's fixed body is ever sent, never ``detail`` or a traceback:
    details go to the log, where the operator can see them and the client cannot.
    """
    body = error.body.encode("latin-1")
    headers = [_TEXT, ("content-length", str(len(body)))] if body else [("content-length", "0")]
    if error.headers:
        headers.extend(error.headers)
    return ResponseHead(error.status, headers), body
