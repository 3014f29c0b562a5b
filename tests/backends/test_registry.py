"""The registry of backends: what each backend declares (presets, help, pip extra) and everything that reads it."""

from __future__ import annotations

import re
import sys
import typing
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import tomllib
import torch
from torch import nn
from typer.testing import CliRunner

from pipequant import MissingBackendError
from pipequant.backends import backend_for, backend_names, backends, config_classes, get_backend
from pipequant.backends.base import LayerState
from pipequant.cli import app
from pipequant.presets import PLAN_CANDIDATES, PRESETS, preset

PYPROJECT = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
EXTRAS: dict[str, list[str]] = PYPROJECT["project"]["optional-dependencies"]


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements: list[str]) -> set[str]:
    return {normalized(re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]) for requirement in requirements}


@pytest.mark.parametrize("backend", backends(), ids=lambda backend: backend.name)
def test_each_declared_extra_is_in_pyproject_and_installs_the_backends_library(backend):
    assert backend.pip_extra in EXTRAS, f"pyproject.toml has no extra {backend.pip_extra!r}"
    # the installed distributions that provide the library's import name ("optimum" -> optimum-quanto)
    providers = {normalized(name) for name in packages_distributions()[backend.module_name.split(".")[0]]}
    assert providers & requirement_names(EXTRAS[backend.pip_extra])
    assert providers & requirement_names(EXTRAS["all"])


@pytest.mark.parametrize("backend", backends(), ids=lambda backend: backend.name)
def test_a_missing_library_is_an_error_naming_the_extra(backend, monkeypatch):
    monkeypatch.setitem(sys.modules, backend.module_name, None)  # how importlib sees a package that is not installed
    with pytest.raises(MissingBackendError, match=re.escape(f"pip install 'pipequant[{backend.pip_extra}]'")):
        backend.require()


@pytest.mark.parametrize("backend", backends(), ids=lambda backend: backend.name)
def test_a_backend_is_generic_in_the_config_class_it_declares(backend):
    (generic_base,) = [base for base in type(backend).__orig_bases__ if typing.get_origin(base) is not None]
    assert typing.get_args(generic_base) == (backend.config_class,)


def test_names_and_modes_are_unique_and_listed_in_registry_order():
    names = [backend.name for backend in backends()]
    assert len(set(names)) == len(names) and sorted(names) == backend_names()
    declared = [mode for backend in backends() for mode in backend.presets]
    assert len(set(declared)) == len(declared), "two backends declare the same mode"
    assert list(PRESETS) == declared
    assert PLAN_CANDIDATES == tuple(mode for backend in backends() for mode in backend.plan_candidates)
    methods = [config_class.quant_method for config_class in config_classes()]
    assert len(set(methods)) == len(methods)


@pytest.mark.parametrize("mode", list(PRESETS))
def test_each_mode_builds_a_config_of_the_backend_that_declares_it(mode):
    owner = next(backend for backend in backends() if mode in backend.presets)
    config = preset(mode)
    assert isinstance(config, owner.config_class) and config.backend_name == owner.name
    assert get_backend(config.backend_name) is owner


def test_plan_candidates_are_modes_of_their_backend():
    for backend in backends():
        assert set(backend.plan_candidates) <= set(backend.presets), backend.name


def test_quantize_help_lists_every_backend_with_its_help():
    result = CliRunner().invoke(app, ["quantize", "--help"], env={"COLUMNS": "400"}, terminal_width=400)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.replace("│", " ").split())
    for backend in backends():
        assert f"{backend.name}: {backend.cli_help}" in text


def test_a_stored_layer_is_rebuilt_only_into_a_linear_layer(each_backend):
    """A checkpoint whose layer name belongs to another kind of layer in the model is a ValueError, which the
    loader reports as a `CheckpointError` naming the file."""
    conv = nn.Conv2d(4, 4, 1, device="meta")
    with pytest.raises(ValueError, match="linear layers only, and this layer is a Conv2d"):
        backend_for(each_backend).restore(conv, LayerState({}), each_backend, torch.device("cpu"))
