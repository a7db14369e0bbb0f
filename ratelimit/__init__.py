"""Rate limiting: token buckets in process and a global limiter on Redis.

``policy`` compiles RateLimitPolicy resources into the limits routes carry;
``local`` and ``redis_backend`` keep the buckets; ``limiter`` is the decision API
the gateway's rate-limit stage calls. Nothing here imports the protocol layer.
"""

from .limiter import Limiter, RedisNotConfigured, Verdict
from .local import LocalBuckets, Outcome, gcra
from .policy import Limit, Policy, Rate, RouteRateLimit, compile_policies, limits_for_route
from .redis_backend import RedisBackend, RedisURLError, parse_redis_url

__all__ = [
    "Limit",
    "Limiter",
    "LocalBuckets",
    "Outcome",
    "Policy",
    "Rate",
    "RedisBackend",
    "RedisNotConfigured",
    "RedisURLError",
    "RouteRateLimit",
    "Verdict",
    "compile_policies",
    "gcra",
    "limits_for_route",
    "parse_redis_url",
]
