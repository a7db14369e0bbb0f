"""The admin API (a starlette app served by hypercorn, never on the request path)."""

from .app import AdminState, Readiness, build_admin_app, redact, serve_admin

__all__ = ["AdminState", "Readiness", "build_admin_app", "redact", "serve_admin"]
