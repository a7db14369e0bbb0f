"""Fixtures for the rate-limit unit tests: a real redis-server per test."""

from redis_server import redis_server

__all__ = ["redis_server"]
