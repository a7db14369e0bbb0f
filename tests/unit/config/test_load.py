"""Loader behaviour that golden cases cannot show: file discovery, load order, the
recorded lines, and the split between load_resources and validate."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigErrors, load_config, load_resources, validate
from gateway.config.resources import Percent, VirtualServiceSpec

VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: {name}
spec:
  hosts: [{name}.example.test]
  http:
  - route:
    - destination:
        host: {name}
"""


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_directory_is_read_in_name_order_without_subdirectories_or_hidden_files(
    tmp_path: Path,
) -> None:
    _write(tmp_path / "b.yml", VS.format(name="bravo"))
    _write(tmp_path / "a.yaml", VS.format(name="alpha"))
    _write(tmp_path / "c.yaml.bak", VS.format(name="ignored-backup"))
    _write(tmp_path / ".hidden.yaml", VS.format(name="ignored-hidden"))
    _write(tmp_path / "sub" / "d.yaml", VS.format(name="ignored-nested"))
    model = load_config([str(tmp_path)])
    assert [r.metadata.name for r in model.resources] == ["alpha", "bravo"]


def test_paths_keep_the_order_given_and_a_file_named_twice_is_read_once(tmp_path: Path) -> None:
    second = _write(tmp_path / "z.yaml", VS.format(name="zulu"))
    first = _write(tmp_path / "other" / "a.yaml", VS.format(name="alpha"))
    model = load_config([str(second), str(first.parent), str(first)])
    assert [r.metadata.name for r in model.resources] == ["zulu", "alpha"]


def test_missing_path_is_an_error_and_empty_directory_a_warning(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigErrors) as caught:
        load_config([str(missing), str(tmp_path / "empty")])
    assert [str(e) for e in caught.value.errors] == [f"{missing}: no such file or directory"]
    assert [str(w) for w in caught.value.warnings] == [
        f"{tmp_path / 'empty'}: no *.yaml or *.yml files in this directory"
    ]


def test_empty_directory_alone_is_valid_with_a_warning(tmp_path: Path) -> None:
    model = load_config([str(tmp_path)])
    assert model.resources == ()
    assert len(model.warnings) == 1


def test_file_that_is_not_utf8_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("metadata: {name: caf\xe9}\n".encode("latin-1"))
    with pytest.raises(ConfigErrors) as caught:
        load_config([str(path)])
    assert [str(e) for e in caught.value.errors] == [f"{path}: not UTF-8 text"]


def test_every_node_keeps_its_line_and_unknown_paths_fall_back_to_an_ancestor(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path / "vs.yaml", "# leading comment\n" + VS.format(name="shop"))
    (resource,) = load_config([str(path)]).resources
    assert resource.source == f"{path}:2"
    assert resource.lines["metadata.name"] == 5
    assert resource.lines["spec.hosts[0]"] == 7
    assert resource.lines["spec.http[0].route[0].destination.host"] == 11
    assert resource.where("spec.http[0].route[0].weight") == f"{path}:10"
    assert resource.where("spec.http[0].timeout") == f"{path}:9"


def test_parsed_spec_is_typed_with_defaults_filled_in(tmp_path: Path) -> None:
    text = VS.format(name="shop") + "    mirrorPercentage: {value: 5}\n"
    path = _write(tmp_path / "vs.yaml", text)
    (resource,) = load_resources([str(path)])
    assert isinstance(resource.spec, VirtualServiceSpec)
    route = resource.spec.http[0]
    assert route.mirror_percentage == Percent(5.0)  # an integer is accepted as a float
    assert isinstance(route.mirror_percentage.value, float)
    assert route.route[0].weight is None
    assert resource.metadata.namespace == "default"


def test_load_resources_does_not_validate_and_validate_reports_everything(
    tmp_path: Path,
) -> None:
    text = VS.format(name="shop") + "    timeout: soon\n    directResponse: {status: 99}\n"
    path = _write(tmp_path / "vs.yaml", text)
    resources = load_resources([str(path)])
    with pytest.raises(ConfigErrors) as caught:
        validate(resources)
    messages = [e.message for e in caught.value.errors]
    assert messages == [
        "only one of route, redirect, directResponse or delegate may be set; "
        "found route and directResponse",
        "status 99 is outside 200..599",
        '"soon" is not a duration (examples: 1s, 100ms, 1.5s, 1m, 1h)',
    ]
    assert str(caught.value).endswith("3 errors in 1 resource; nothing was applied")


def test_load_resources_raises_on_parse_errors(tmp_path: Path) -> None:
    path = _write(tmp_path / "vs.yaml", VS.format(name="shop").replace("host:", "hots:"))
    with pytest.raises(ConfigErrors) as caught:
        load_resources([str(path)])
    assert [e.path for e in caught.value.errors] == [
        "spec.http[0].route[0].destination",
        "spec.http[0].route[0].destination",
    ]
    assert caught.value.errors[0].message.startswith('unknown field "hots"')
    assert caught.value.errors[1].message == 'missing required field "host"'


def test_control_characters_are_a_syntax_error_with_a_line(tmp_path: Path) -> None:
    path = tmp_path / "nul.yaml"
    path.write_text("apiVersion: v1\nkind: \x00\n", encoding="utf-8")
    with pytest.raises(ConfigErrors) as caught:
        load_config([str(path)])
    assert [str(e) for e in caught.value.errors] == [
        f"{path}:2: YAML syntax error: character #x0000 is not allowed in YAML"
    ]
