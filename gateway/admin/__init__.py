"""The admin API (a starlette app served by hypercorn, never on the request path)."""

from .app import Readiness, build_admin_app, serve_admin

__all__ = ["Readiness", "build_admin_app", "serve_admin"]
