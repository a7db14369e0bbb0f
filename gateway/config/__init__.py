"""Configuration: Istio resources loaded from YAML with file:line, typed and validated.

``load_config(paths)`` is the front door: it finds the files, parses every document,
validates the lot and returns a ``Model`` or raises ``ConfigErrors`` with every error.
"""

from .durations import DurationError, parse_duration_s
from .errors import ConfigError, ConfigErrors, Model
from .load import find_config_files, load_config, load_resources
from .validate import check, validate

__all__ = [
    "ConfigError",
    "ConfigErrors",
    "DurationError",
    "Model",
    "check",
    "find_config_files",
    "load_config",
    "load_resources",
    "parse_duration_s",
    "validate",
]
