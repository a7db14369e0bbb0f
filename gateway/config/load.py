"""Loading configuration: files and directories of YAML in, a validated ``Model`` out.

    load_config(paths)      -> Model, or raises ConfigErrors with every error at once
    load_resources(paths)   -> list[Resource], or ConfigErrors with the load errors
    find_config_files(paths)

This module owns finding the files, reading multi-document YAML with PyYAML's
composer (so every node keeps its line), telling the kinds apart (which are parsed,
which are ignored with a warning, which are errors) and spotting duplicates. Turning
a document's ``spec`` into typed objects is ``parse.py``'s job; checking what the
values mean is ``validate.py``'s.

A directory contributes its ``*.yaml`` and ``*.yml`` files, sorted by name, not
recursing into subdirectories and skipping hidden files. Resources keep load order:
the order of the paths given, then file order, then document order.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import yaml

from .errors import ConfigError, ConfigErrors, Model
from .gatewayapi import GATEWAY_API_GROUP, GATEWAY_API_VERSIONS
from .parse import INVALID, Parser, Problem
from .resources import API_VERSIONS, Metadata, Resource
from .validate import check

__all__ = ["find_config_files", "load_config", "load_resources"]

NETWORKING_GROUP = "networking.istio.io"
SECURITY_GROUP = "security.istio.io"
MESHGATE_GROUP = "meshgate.io"

# Istio networking kinds meshgate does not implement: real Istio configuration,
# so a warning rather than the "unknown kind" error a typo gets.
_UNSUPPORTED_ISTIO_KINDS = frozenset(
    {"EnvoyFilter", "ProxyConfig", "Sidecar", "WorkloadEntry", "WorkloadGroup"}
)

# ObjectMeta fields Kubernetes adds (``kubectl get -o yaml``); accepted and dropped.
_KUBERNETES_METADATA = frozenset(
    {
        "deletionGracePeriodSeconds",
        "deletionTimestamp",
        "finalizers",
        "generateName",
        "generation",
        "managedFields",
        "ownerReferences",
        "resourceVersion",
        "selfLink",
        "uid",
    }
)
# Gateway API kinds meshgate does not serve (layer-4 routes, policies, experimental
# kinds): warned about and ignored, like the Istio kinds above.
_UNSUPPORTED_GATEWAY_API_KINDS = frozenset(
    {"BackendLBPolicy", "BackendTLSPolicy", "ListenerSet", "TCPRoute", "TLSRoute", "UDPRoute"}
)
_TOP_LEVEL = ("apiVersion", "kind", "metadata", "spec", "status")
_UNNAMED = "<unnamed>"


@dataclass(slots=True)
class _Loaded:
    resources: list[Resource] = field(default_factory=list)
    errors: list[ConfigError] = field(default_factory=list)
    warnings: list[ConfigError] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    # Resources whose document had parse problems, by key, with the paths the
    # parser had to leave at their defaults. They are validated (to report everything
    # in one pass) but never returned.
    damaged: dict[tuple[str, str, str], list[str]] = field(default_factory=dict)


def _file_error(path: str, message: str, line: int | None = None) -> ConfigError:
    source = f"{path}:{line}" if line is not None else path
    return ConfigError("", "", "", "", message, source=source)


def find_config_files(
    paths: Sequence[str],
) -> tuple[list[str], list[ConfigError], list[ConfigError]]:
    """The YAML files named by ``paths`` (files or directories), plus errors and warnings.

    A file named twice (directly or through its directory) is read once.
    """
    files: list[str] = []
    errors: list[ConfigError] = []
    warnings: list[ConfigError] = []
    seen: set[str] = set()

    def add(candidate: str) -> None:
        real = os.path.realpath(candidate)
        if real not in seen:
            seen.add(real)
            files.append(candidate)

    for path in paths:
        if os.path.isdir(path):
            names = sorted(
                name
                for name in os.listdir(path)
                if name.endswith((".yaml", ".yml"))
                and not name.startswith(".")
                and os.path.isfile(os.path.join(path, name))
            )
            if not names:
                warnings.append(_file_error(path, "no *.yaml or *.yml files in this directory"))
            for name in names:
                add(os.path.join(path, name))
        elif os.path.isfile(path):
            add(path)
        else:
            errors.append(_file_error(path, "no such file or directory"))
    return files, errors, warnings


def _peek_scalar(node: yaml.MappingNode, *keys: str) -> str | None:
    """A string found at ``keys`` under ``node``, without reporting anything."""
    current: yaml.Node = node
    for key in keys:
        if not isinstance(current, yaml.MappingNode):
            return None
        for key_node, value_node in current.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
                current = value_node
                break
        else:
            return None
    if isinstance(current, yaml.ScalarNode) and current.tag == "tag:yaml.org,2002:str":
        return current.value
    return None


class _FileReader:
    """Reads one file's documents into ``loaded``."""

    def __init__(self, path: str, loaded: _Loaded) -> None:
        self.path = path
        self.loaded = loaded

    def read(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as handle:
                text = handle.read()
        except UnicodeDecodeError:
            self.loaded.errors.append(_file_error(self.path, "not UTF-8 text"))
            return
        except OSError as exc:
            self.loaded.errors.append(_file_error(self.path, f"cannot read: {exc.strerror}"))
            return
        loader: yaml.SafeLoader | None = None
        try:
            loader = yaml.SafeLoader(text)  # refuses control characters right away
            # Documents before a syntax error are kept: their own problems are worth
            # reporting in the same pass.
            while loader.check_node():
                node = loader.get_node()
                if node is None or Parser.is_null(node):
                    continue  # an empty document ("---" followed by nothing)
                self.document(loader, node)
        except yaml.reader.ReaderError as exc:
            line = text.count("\n", 0, exc.position) + 1
            self.loaded.errors.append(
                _file_error(
                    self.path,
                    f"YAML syntax error: character #x{exc.character:04x} is not allowed in YAML",
                    line,
                )
            )
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else None
            detail = exc.problem or "invalid YAML"
            if exc.context and exc.context_mark is not None:
                detail += f" ({exc.context} on line {exc.context_mark.line + 1})"
            self.loaded.errors.append(_file_error(self.path, f"YAML syntax error: {detail}", line))
        except yaml.YAMLError as exc:
            self.loaded.errors.append(_file_error(self.path, f"YAML syntax error: {exc}"))
        finally:
            if loader is not None:
                loader.dispose()

    def document(self, loader: yaml.SafeLoader, root: yaml.Node) -> None:
        line = root.start_mark.line + 1
        source = f"{self.path}:{line}"
        if not isinstance(root, yaml.MappingNode):
            self.loaded.errors.append(
                _file_error(
                    self.path,
                    "a document must be a mapping with apiVersion, kind, metadata and spec",
                    line,
                )
            )
            return
        parser = Parser(loader, ignored={Metadata: _KUBERNETES_METADATA})
        fields = {}
        for key, key_node, value_node in parser.pairs(root, ""):
            if key not in _TOP_LEVEL:
                parser.problem(
                    "", key_node, f'unknown field "{key}"; valid fields: {", ".join(_TOP_LEVEL)}'
                )
                continue
            parser.mark(key, key_node)
            fields[key] = value_node

        api_version = self.header(parser, root, fields, "apiVersion")
        kind = self.header(parser, root, fields, "kind")
        namespace = _peek_scalar(root, "metadata", "namespace") or "default"
        name = _peek_scalar(root, "metadata", "name") or _UNNAMED
        if api_version is None or kind is None:
            self.report(parser.problems, "", "", "")
            return

        group = api_version.partition("/")[0] if "/" in api_version else ""
        if group == SECURITY_GROUP and kind not in API_VERSIONS:
            # RequestAuthentication and AuthorizationPolicy are read; the rest of the
            # group (PeerAuthentication) is not served yet.
            self.warn(kind, namespace, name, source, "not yet supported, ignored")
            return
        if group == GATEWAY_API_GROUP and kind in _UNSUPPORTED_GATEWAY_API_KINDS:
            self.warn(kind, namespace, name, source, "not supported by meshgate, ignored")
            return
        if group == NETWORKING_GROUP and kind in _UNSUPPORTED_ISTIO_KINDS:
            self.warn(kind, namespace, name, source, "not supported by meshgate, ignored")
            return
        if group not in (NETWORKING_GROUP, MESHGATE_GROUP, SECURITY_GROUP, GATEWAY_API_GROUP):
            self.warn(
                kind,
                namespace,
                name,
                source,
                f"{api_version} is not an Istio networking API; ignored",
            )
            return
        # The Gateway API has its own "Gateway": the group decides which one is meant.
        registry = GATEWAY_API_VERSIONS if group == GATEWAY_API_GROUP else API_VERSIONS
        known = registry.get(kind)
        if known is None:
            supported = ", ".join(sorted(registry))
            parser.problem(
                "kind", fields["kind"], f'unknown kind "{kind}"; supported kinds: {supported}'
            )
            self.report(parser.problems, "", "", "")
            return
        versions, spec_class = known
        if api_version not in versions:
            parser.problem(
                "apiVersion",
                fields["apiVersion"],
                f'"{api_version}" is not a supported apiVersion of {kind}; '
                f"use one of: {', '.join(versions)}",
            )

        null = yaml.ScalarNode("tag:yaml.org,2002:null", "", root.start_mark, root.start_mark)
        metadata = parser.parse(fields.get("metadata", null), Metadata, "metadata")
        spec = parser.parse(fields.get("spec", null), spec_class, "spec")
        if metadata is not INVALID:
            namespace, name = metadata.namespace, metadata.name
        self.report(parser.problems, kind, namespace, name)
        if metadata is INVALID or spec is INVALID:
            return
        if parser.problems:
            self.loaded.damaged.setdefault((kind, namespace, name), parser.broken)
        self.loaded.resources.append(
            Resource(
                api_version=api_version,
                kind=kind,
                metadata=metadata,
                spec=spec,
                source=source,
                file=self.path,
                lines=parser.lines,
            )
        )

    def header(
        self, parser: Parser, root: yaml.Node, fields: dict[str, yaml.Node], key: str
    ) -> str | None:
        node = fields.get(key)
        if node is None:
            parser.problem("", root, f'missing required field "{key}"')
            return None
        value = parser.parse(node, str, key)
        return None if value is INVALID else value

    def report(self, problems: Iterable[Problem], kind: str, namespace: str, name: str) -> None:
        for p in problems:
            self.loaded.errors.append(
                ConfigError(kind, namespace, name, p.path, p.message, f"{self.path}:{p.line}")
            )

    def warn(self, kind: str, namespace: str, name: str, source: str, message: str) -> None:
        self.loaded.warnings.append(
            ConfigError(kind, namespace, name, "", message, source=source, warning=True)
        )


def _load(paths: Sequence[str]) -> _Loaded:
    files, errors, warnings = find_config_files(paths)
    loaded = _Loaded(errors=errors, warnings=warnings, files=files)
    for path in files:
        _FileReader(path, loaded).read()
    first: dict[tuple[str, str, str, str], Resource] = {}
    unique: list[Resource] = []
    for resource in loaded.resources:
        key = (
            resource.api_group,
            resource.kind,
            resource.metadata.namespace,
            resource.metadata.name,
        )
        earlier = first.get(key)
        if earlier is None:
            first[key] = resource
            unique.append(resource)
            continue
        loaded.errors.append(
            ConfigError(
                resource.kind,
                resource.metadata.namespace,
                resource.metadata.name,
                "metadata.name",
                f"duplicate {resource.key}; also defined at {earlier.where('metadata.name')}",
                source=resource.where("metadata.name"),
            )
        )
    loaded.resources = unique
    return loaded


def _in_file_order(problems: list[ConfigError], files: list[str]) -> list[ConfigError]:
    """Problems sorted by file (load order) and line; stable for equal places."""
    rank = {path: i for i, path in enumerate(files)}

    def key(problem: ConfigError) -> tuple[int, int]:
        if not problem.source:
            return (-1, 0)
        path, _, line = problem.source.rpartition(":")
        if path in rank and line.isdigit():
            return (rank[path], int(line))
        return (rank.get(problem.source, -1), 0)

    return sorted(problems, key=key)


def _related(path: str, other: str) -> bool:
    """Is one path the other, or inside it?"""

    def inside(a: str, b: str) -> bool:
        return a == b or a.startswith((b + ".", b + "["))

    return inside(path, other) or inside(other, path)


def _drop_echoes(problems: list[ConfigError], loaded: _Loaded) -> list[ConfigError]:
    """Semantic findings on damaged resources, minus those about fields left broken."""
    kept = []
    for problem in problems:
        broken = loaded.damaged.get((problem.kind, problem.namespace, problem.name))
        if broken is not None and any(_related(problem.path, b) for b in broken):
            continue
        kept.append(problem)
    return kept


def load_resources(paths: Sequence[str]) -> list[Resource]:
    """Every resource in ``paths``, parsed but not semantically validated.

    Raises ``ConfigErrors`` with every load and parse error found.
    """
    loaded = _load(paths)
    if loaded.errors:
        raise ConfigErrors(
            _in_file_order(loaded.errors, loaded.files),
            _in_file_order(loaded.warnings, loaded.files),
        )
    return loaded.resources


def load_config(paths: Sequence[str]) -> Model:
    """Load, parse and validate every resource in ``paths`` (files or directories).

    Returns the ``Model`` (resources in load order, plus warnings) or raises
    ``ConfigErrors`` holding every error of every file at once. Resources that parsed
    are validated even when others did not, so one pass shows all the problems.
    """
    loaded = _load(paths)
    errors, warnings = check(loaded.resources)
    errors = _drop_echoes(errors, loaded)
    warnings = _drop_echoes(warnings, loaded)
    all_errors = _in_file_order(loaded.errors + errors, loaded.files)
    all_warnings = _in_file_order(loaded.warnings + warnings, loaded.files)
    if all_errors:
        raise ConfigErrors(all_errors, all_warnings)
    return Model(tuple(loaded.resources), tuple(all_warnings))
