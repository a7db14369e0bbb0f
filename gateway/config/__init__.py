"""Configuration: Istio resources loaded from YAML with file:line, typed and validated."""

from .errors import ConfigError, ConfigErrors, Model

__all__ = ["ConfigError", "ConfigErrors", "Model"]
