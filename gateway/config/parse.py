"""Turning composed YAML nodes into the typed resources of ``resources.py``.

The parser is generic: it reads the dataclass field types (``int``, ``str | None``,
``list[Destination]``, ``dict[str, StringMatch]``, ``Any`` ...) and walks the YAML
node tree beside them. It never stops at the first problem: every unknown field,
missing field and wrong type of a document is reported, each with the field path in
YAML spelling (``spec.http[1].route[0].weight``) and the line of its node.

It also records the line of *every* node it visits, so later stages can point at the
exact place of a semantic problem (``Resource.lines``).

Type rules (decided here, documented in docs/configuration.md):

- ``null`` means "not set": an optional field keeps its default, a list or map
  becomes empty, a required field is reported missing.
- ``int`` accepts YAML integers only: not booleans, not ``1.0``, not ``"80"``
  (the quoted number is a string, as Kubernetes' schema validation sees it).
- ``float`` accepts integers and floats.
- ``str`` accepts YAML strings only. ``version: 1`` or ``x-debug: yes`` are refused
  with a hint to quote the value, since Istio's JSON schema refuses them too.
  Timestamps (``2024-05-01``) are kept as the text written.
- ``Any`` (and ``dict[str, Any]``) fields are passed through as plain Python data.

What the values *mean* (ports in range, durations, regexes) is ``validate.py``'s job.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from .resources import yaml_name

__all__ = ["INVALID", "Parser", "Problem", "child_path", "spec_to_data"]

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"

_SIMPLE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class _Invalid:
    """The value of a node that could not be parsed; its problems are recorded."""

    def __repr__(self) -> str:
        return "INVALID"


INVALID: Any = _Invalid()


@dataclass(frozen=True, slots=True)
class Problem:
    """One parse problem: the field path, the line to show, and what is wrong."""

    path: str
    line: int
    message: str


def child_path(parent: str, key: str) -> str:
    """``spec`` + ``http`` -> ``spec.http``; map keys with dots or slashes are bracketed.

    ``metadata.labels["app.kubernetes.io/name"]`` stays unambiguous, and
    ``Resource.where`` still finds the parent's line by cutting at the bracket.
    """
    if _SIMPLE_KEY.fullmatch(key):
        return f"{parent}.{key}" if parent else key
    return f'{parent}["{key}"]'


def _describe(node: yaml.Node) -> str:
    """What a node is, in the words a user reads in an error: "a list", "a number"."""
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return {
        _STR: "a string",
        _INT: "a number",
        _FLOAT: "a number",
        _BOOL: "a boolean",
        _NULL: "null",
        _TIMESTAMP: "a timestamp",
    }.get(node.tag, f"a {node.tag} value")


@dataclass(frozen=True, slots=True)
class _Fields:
    """A dataclass's fields by YAML name, with their resolved types."""

    by_yaml: dict[str, tuple[str, Any]]  # yaml name -> (python name, type)
    required: tuple[str, ...]  # yaml names


_FIELDS_CACHE: dict[type, _Fields] = {}


def _fields_of(cls: type) -> _Fields:
    cached = _FIELDS_CACHE.get(cls)
    if cached is not None:
        return cached
    hints = typing.get_type_hints(cls)
    by_yaml: dict[str, tuple[str, Any]] = {}
    required: list[str] = []
    for f in dataclasses.fields(cls):
        name = f.metadata.get("yaml") or yaml_name(f.name)
        by_yaml[name] = (f.name, hints[f.name])
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(name)
    result = _Fields(by_yaml, tuple(required))
    _FIELDS_CACHE[cls] = result
    return result


def _optional_inner(tp: Any) -> Any | None:
    """``X | None`` -> ``X``; anything else -> None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


@dataclass(slots=True)
class Parser:
    """Parses the nodes of one document; collects problems and the line of every node.

    ``loader`` is the ``yaml.SafeLoader`` that composed the nodes: its constructor
    turns scalars and ``Any`` subtrees into Python values with YAML's own rules.
    ``ignored`` names fields that are accepted and dropped for a class (Kubernetes
    bookkeeping in ``metadata`` such as ``uid`` or ``resourceVersion``).

    Parsing is forgiving so that one pass finds as much as possible: an unknown field
    is reported and skipped, and an optional field whose value is wrong is reported
    and left at its default, its path added to ``broken``. Only a required field that
    is missing or wrong makes its object ``INVALID`` (and a list holding it, since
    dropping an item would shift the indices of the rest). The validator can still
    look at such a resource; its findings about ``broken`` paths are dropped, as they
    would only echo the parse problem.
    """

    loader: yaml.SafeLoader
    ignored: Mapping[type, frozenset[str]] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)
    _active: set[int] = field(default_factory=set)  # nodes being parsed, to stop alias loops

    # ------------------------------------------------------------------ helpers

    def problem(self, path: str, node: yaml.Node, message: str) -> None:
        self.problems.append(Problem(path, node.start_mark.line + 1, message))

    def mark(self, path: str, node: yaml.Node) -> None:
        # setdefault: a mapping field's key line was recorded first and is the
        # line a reader looks for ("route:" rather than the first line below it).
        self.lines.setdefault(path, node.start_mark.line + 1)

    def pairs(self, node: yaml.MappingNode, path: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
        """The (key, key node, value node) pairs of a mapping, merge keys applied.

        Non-string keys and repeated keys are reported; a repeated key keeps its first
        value so the report and the result agree about which one was used.
        """
        # Repeats are looked for among the keys written here; keys merged in with
        # "<<: *anchor" are defaults that a written key overrides, as YAML intends.
        seen: dict[str, int] = {}
        skip: set[int] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in (_STR, _INT):
                self.problem(path, key_node, f"keys must be strings, got {_describe(key_node)}")
                skip.add(id(key_node))
                continue
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                self.problems.append(
                    Problem(
                        child_path(path, key),
                        line,
                        f'duplicate key "{key}" (first set on line {seen[key]})',
                    )
                )
                skip.add(id(key_node))
                continue
            seen[key] = line
        self.loader.flatten_mapping(node)  # merged pairs come first, written ones after
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            if id(key_node) in skip or not isinstance(key_node, yaml.ScalarNode):
                continue
            out.pop(key_node.value, None)  # a later pair wins and takes its place
            out[key_node.value] = (key_node, value_node)
        return [(key, k, v) for key, (k, v) in out.items()]

    @staticmethod
    def is_null(node: yaml.Node) -> bool:
        return isinstance(node, yaml.ScalarNode) and node.tag == _NULL

    # ------------------------------------------------------------------ parsing

    def parse(self, node: yaml.Node, tp: Any, path: str) -> Any:
        """The value of ``node`` as type ``tp``, or ``INVALID`` (problems recorded)."""
        self.mark(path, node)
        if id(node) in self._active:
            # "&a [*a]": an alias inside its own anchor; no finite value to build.
            self.problem(path, node, "an alias refers to a node that contains it")
            return INVALID
        if isinstance(node, yaml.ScalarNode):
            return self._parse_node(node, tp, path)
        self._active.add(id(node))
        try:
            return self._parse_node(node, tp, path)
        finally:
            self._active.discard(id(node))

    def _parse_node(self, node: yaml.Node, tp: Any, path: str) -> Any:
        inner = _optional_inner(tp)
        if inner is not None:
            if self.is_null(node):
                return None
            tp = inner
        if tp is Any:
            return self._construct_any(node, path)
        if dataclasses.is_dataclass(tp):
            return self._parse_dataclass(node, tp, path)
        origin = typing.get_origin(tp)
        if origin is list:
            return self._parse_list(node, typing.get_args(tp)[0], path)
        if origin is dict:
            return self._parse_dict(node, typing.get_args(tp)[1], path)
        if tp is str:
            return self._parse_str(node, path)
        if tp is bool:
            return self._parse_bool(node, path)
        if tp is int:
            return self._parse_int(node, path)
        if tp is float:
            return self._parse_float(node, path)
        raise TypeError(f"meshgate cannot parse a field of type {tp!r}")  # a resources.py bug

    def _construct_any(self, node: yaml.Node, path: str) -> Any:
        if not self._mark_tree(node, path, set()):
            return INVALID
        return self.loader.construct_object(node, deep=True)

    def _mark_tree(self, node: yaml.Node, path: str, visiting: set[int]) -> bool:
        """Record the lines of a free-form subtree; False if an alias loops back."""
        self.mark(path, node)
        if isinstance(node, yaml.ScalarNode):
            return True
        if id(node) in visiting:
            self.problem(path, node, "an alias refers to a node that contains it")
            return False
        visiting.add(id(node))
        ok = True
        if isinstance(node, yaml.MappingNode):
            for key, key_node, value in self.pairs(node, path):
                sub = child_path(path, key)
                self.mark(sub, key_node)
                ok = self._mark_tree(value, sub, visiting) and ok
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                ok = self._mark_tree(item, f"{path}[{i}]", visiting) and ok
        visiting.discard(id(node))
        return ok

    def _parse_dataclass(self, node: yaml.Node, cls: type, path: str) -> Any:
        if self.is_null(node):
            node = yaml.MappingNode("tag:yaml.org,2002:map", [], node.start_mark, node.end_mark)
        if not isinstance(node, yaml.MappingNode):
            self.problem(path, node, f"expected a mapping, got {_describe(node)}")
            return INVALID
        spec = _fields_of(cls)
        ignored = self.ignored.get(cls, frozenset())
        values: dict[str, Any] = {}
        present: set[str] = set()
        ok = True
        for key, key_node, value_node in self.pairs(node, path):
            entry = spec.by_yaml.get(key)
            if entry is None:
                if key in ignored:
                    continue
                valid = ", ".join(sorted(spec.by_yaml))
                self.problem(path, key_node, f'unknown field "{key}"; valid fields: {valid}')
                continue
            python_name, tp = entry
            present.add(key)
            sub = child_path(path, key)
            self.mark(sub, key_node)
            value = self.parse(value_node, tp, sub)
            if value is INVALID:
                if key in spec.required:
                    ok = False
                else:
                    self.broken.append(sub)
            elif value is None and _optional_inner(tp) is None and self.is_null(value_node):
                # null for a list/map/defaulted field: "not set", keep the default.
                if key in spec.required:
                    self.problem(sub, value_node, f'required field "{key}" is null')
                    ok = False
            else:
                values[python_name] = value
        for key in spec.required:
            if key not in present:
                self.problem(path, node, f'missing required field "{key}"')
                ok = False
        if not ok:
            return INVALID
        return cls(**values)

    def _parse_list(self, node: yaml.Node, item_tp: Any, path: str) -> Any:
        if self.is_null(node):
            return None
        if not isinstance(node, yaml.SequenceNode):
            self.problem(path, node, f"expected a list, got {_describe(node)}")
            return INVALID
        items = [self.parse(item, item_tp, f"{path}[{i}]") for i, item in enumerate(node.value)]
        if any(item is INVALID for item in items):
            return INVALID
        return items

    def _parse_dict(self, node: yaml.Node, value_tp: Any, path: str) -> Any:
        if self.is_null(node):
            return None
        if not isinstance(node, yaml.MappingNode):
            self.problem(path, node, f"expected a mapping, got {_describe(node)}")
            return INVALID
        out: dict[str, Any] = {}
        for key, key_node, value_node in self.pairs(node, path):
            sub = child_path(path, key)
            self.mark(sub, key_node)
            value = self.parse(value_node, value_tp, sub)
            if value is INVALID:
                self.broken.append(sub)
            else:
                out[key] = value
        return out

    def _scalar(self, node: yaml.Node, path: str, want: str) -> bool:
        if isinstance(node, yaml.ScalarNode):
            return True
        self.problem(path, node, f"expected {want}, got {_describe(node)}")
        return False

    def _parse_str(self, node: yaml.Node, path: str) -> Any:
        if not self._scalar(node, path, "a string"):
            return INVALID
        if node.tag in (_STR, _TIMESTAMP):
            return node.value
        hint = f' (quote it: "{node.value}")' if node.tag in (_INT, _FLOAT, _BOOL) else ""
        self.problem(path, node, f"expected a string, got {_describe(node)}{hint}")
        return INVALID

    def _parse_bool(self, node: yaml.Node, path: str) -> Any:
        if not self._scalar(node, path, "a boolean"):
            return INVALID
        if node.tag == _BOOL:
            return self.loader.construct_object(node)
        self.problem(path, node, f"expected a boolean (true or false), got {_describe(node)}")
        return INVALID

    def _parse_int(self, node: yaml.Node, path: str) -> Any:
        if not self._scalar(node, path, "an integer"):
            return INVALID
        if node.tag == _INT:
            return self.loader.construct_object(node)
        got = f"{node.value}" if node.tag == _FLOAT else _describe(node)
        self.problem(path, node, f"expected an integer, got {got}")
        return INVALID

    def _parse_float(self, node: yaml.Node, path: str) -> Any:
        if not self._scalar(node, path, "a number"):
            return INVALID
        if node.tag in (_INT, _FLOAT):
            return float(self.loader.construct_object(node))
        self.problem(path, node, f"expected a number, got {_describe(node)}")
        return INVALID


def spec_to_data(value: Any) -> Any:
    """A parsed value back as plain data in YAML spelling, defaults left out.

    Used for golden-test output and config dumps: what meshgate understood, in the
    words the user wrote.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if f.default is not dataclasses.MISSING and item == f.default:
                continue
            if f.default_factory is not dataclasses.MISSING and item == f.default_factory():
                continue
            out[f.metadata.get("yaml") or yaml_name(f.name)] = spec_to_data(item)
        return out
    if isinstance(value, list):
        return [spec_to_data(v) for v in value]
    if isinstance(value, dict):
        return {k: spec_to_data(v) for k, v in value.items()}
    return value
