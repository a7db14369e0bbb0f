"""Configuration problems and the validated model handed to the compiler.

    ConfigError      one problem (error or warning), with where and what
    ConfigErrors     raised once with *every* error found; nothing was applied
    Model            resources that passed validation, plus the warnings

A message reads ``file:line: Kind namespace/name: field.path: what is wrong``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .resources import Resource

# Spelled out rather than imported from gatewayapi.py: errors.py sits below it.
GATEWAY_API_GROUP = "gateway.networking.k8s.io"

__all__ = ["ConfigError", "ConfigErrors", "Model"]


@dataclass(frozen=True, slots=True)
class ConfigError:
    kind: str
    namespace: str
    name: str
    path: str  # YAML spelling with indices: spec.http[0].route[1].weight
    message: str
    source: str | None = None  # "routes.yaml:42" when known
    warning: bool = False

    def __str__(self) -> str:
        parts = []
        if self.source:
            parts.append(self.source)
        if self.kind:
            parts.append(f"{self.kind} {self.namespace}/{self.name}")
        if self.path:
            parts.append(self.path)
        parts.append(self.message)
        return ": ".join(parts)


class ConfigErrors(Exception):
    """Every error of one load/validate pass. Raised once; nothing was applied."""

    def __init__(self, errors: list[ConfigError], warnings: list[ConfigError] | None = None):
        self.errors = errors
        self.warnings = warnings or []
        super().__init__(self.summary())

    def summary(self) -> str:
        resources = {(e.kind, e.namespace, e.name) for e in self.errors if e.kind}
        noun = "error" if len(self.errors) == 1 else "errors"
        where = f" in {len(resources)} resource{'s' if len(resources) != 1 else ''}"
        return f"{len(self.errors)} {noun}{where if resources else ''}; nothing was applied"

    def __str__(self) -> str:
        return "\n".join([*(str(e) for e in self.errors), self.summary()])


@dataclass(frozen=True, slots=True)
class Model:
    """Resources that passed validation, in load order (file order, then document order)."""

    resources: tuple[Resource, ...]
    warnings: tuple[ConfigError, ...] = field(default=())

    def of_kind(self, kind: str) -> tuple[Resource, ...]:
        """The Istio/meshgate resources of ``kind`` (never a Gateway API namesake)."""
        return tuple(
            r for r in self.resources if r.kind == kind and r.api_group != GATEWAY_API_GROUP
        )

    def gateway_api(self, kind: str) -> tuple[Resource, ...]:
        """The ``gateway.networking.k8s.io`` resources of ``kind``, in load order."""
        return tuple(
            r for r in self.resources if r.kind == kind and r.api_group == GATEWAY_API_GROUP
        )
