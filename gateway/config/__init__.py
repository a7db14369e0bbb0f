"""Configuration: Istio and Gateway API resources loaded from YAML with file:line,
typed and validated.

``load_config(paths)`` is the front door: it finds the files, parses every document,
validates the lot and returns a ``Model`` or raises ``ConfigErrors`` with every error.
``bind_gateway_api(model)`` decides Gateway API attachment and status from a Model.
"""

from .durations import DurationError, parse_duration_s
from .errors import ConfigError, ConfigErrors, Model
from .gatewayapi_status import bind_gateway_api, status_to_dict, status_warnings
from .load import find_config_files, load_config, load_resources
from .validate import check, validate

__all__ = [
    "ConfigError",
    "ConfigErrors",
    "DurationError",
    "Model",
    "bind_gateway_api",
    "check",
    "find_config_files",
    "load_config",
    "load_resources",
    "parse_duration_s",
    "status_to_dict",
    "status_warnings",
    "validate",
]
