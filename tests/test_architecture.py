"""The import rules in pyproject.toml's ``[tool.importlinter]`` hold on the tree, and would catch a breach.

The contracts run on the real packages; then on a small stand-in tree with the same layout (generated from the
contracts, so it follows them), once clean and once per deliberate bad import, each of which must break the
contract that forbids it. ``make lint`` runs the same contracts with ``lint-imports``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
IMPORTLINTER = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]
CONTRACTS = {c["id"]: c for c in IMPORTLINTER["contracts"]}
# `lint-imports` of this interpreter's environment, whatever the virtualenv is called
LINT_IMPORTS = [
    sys.executable,
    "-c",
    "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
]


def lint_imports(cwd: Path, *config: Path) -> tuple[int, str, dict[str, str]]:
    """Exit status, output and KEPT/BROKEN per contract id of ``lint-imports`` run in ``cwd``."""
    # lint-imports puts its working directory first on sys.path: a stand-in tree shadows the installed packages.
    env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1", "PYTHONPATH": str(cwd)}
    proc = subprocess.run(
        [*LINT_IMPORTS, "--no-cache", "--no-logo", *map(str, config)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )
    out = proc.stdout + proc.stderr
    flat = " ".join(out.split())  # contract names may still wrap on a narrow terminal
    verdicts = {}
    for cid, contract in CONTRACTS.items():
        found = re.search(re.escape(" ".join(contract["name"].split())) + r" (KEPT|BROKEN)", flat)
        verdicts[cid] = found.group(1) if found else "MISSING"
    return proc.returncode, out, verdicts


def test_every_contract_is_kept_by_the_real_tree() -> None:
    rc, out, verdicts = lint_imports(ROOT)
    assert verdicts == {cid: "KEPT" for cid in CONTRACTS}, out
    assert rc == 0, out


def test_the_contracts_cover_the_rules_of_the_architecture() -> None:
    """A guard against quietly loosening the rules: the three contracts and what they name."""
    assert set(IMPORTLINTER["root_packages"]) == {"pipeline", "models", "flows"}
    packages = CONTRACTS["packages"]
    assert packages["type"] == "layers" and packages["layers"] == ["flows", "pipeline", "models"]
    stages = CONTRACTS["stages"]
    assert stages["type"] == "layers" and stages["containers"] == ["pipeline"] and stages["exhaustive"] is True
    *stage_layers, foundations = [_names(layer) for layer in stages["layers"]]
    assert stage_layers == [["cli"], ["reconstruct"], ["train"], ["dataset"], ["sources"], ["masking"]]
    # a new shared module joins the foundations (`exhaustive` makes it declare its place); none may leave them
    assert {"errors", "grid", "regions", "sensors", "normalize", "files", "geotiff"} <= set(foundations)
    assert CONTRACTS["acyclic"]["type"] == "acyclic_siblings"
    assert set(CONTRACTS["acyclic"]["ancestors"]) == {"pipeline", "models", "flows"}


def _names(layer: str) -> list[str]:
    """Module names of one layer entry: ``"a : b"`` (may import each other), ``"a | b"`` (independent)."""
    return [name.strip().strip("()") for name in re.split(r"[:|]", layer)]


def _module(name: str) -> str:
    """The stand-in module of a pipeline child: ``a`` inside a package (as the real one is), else itself."""
    return f"pipeline.{name}.a" if (ROOT / "pipeline" / name).is_dir() else f"pipeline.{name}"


def _write(root: Path, module: str, source: str = "") -> None:
    path = root.joinpath(*module.split("."))
    path.parent.mkdir(parents=True, exist_ok=True)
    for parent in [path.parent, *path.parent.parents]:
        if parent == root:
            break
        (parent / "__init__.py").touch()
    path.with_suffix(".py").write_text(source)


def _add_import(root: Path, module: str, imported: str) -> None:
    path = root.joinpath(*module.split(".")).with_suffix(".py")
    path.write_text(path.read_text() + f"import {imported}\n")


@pytest.fixture
def stand_in(tmp_path: Path) -> Path:
    """flows -> pipeline (every layer importing the one below it) -> models, with no bad import yet."""
    layers = [_names(layer) for layer in CONTRACTS["stages"]["layers"]]
    for upper, lower in zip(layers, [*layers[1:], []]):
        for name in upper:
            _write(tmp_path, _module(name), "".join(f"import {_module(n)}\n" for n in lower[:1]))
            if (ROOT / "pipeline" / name).is_dir():
                _write(tmp_path, f"pipeline.{name}.b", f"import {_module(name)}\n")
    foundations = layers[-1]
    for name in foundations[1:]:  # the shared foundations may import each other
        _add_import(tmp_path, _module(name), _module(foundations[0]))
    _add_import(tmp_path, _module(layers[0][0]), "models.registry")
    _write(tmp_path, "models.base")
    _write(tmp_path, "models.registry", "import models.base\n")
    _write(tmp_path, "flows.demo", f"import {_module(layers[0][0])}\nimport models.registry\n")
    shutil.copy(PYPROJECT, tmp_path / "contracts.toml")
    return tmp_path


def test_the_stand_in_tree_keeps_every_contract(stand_in: Path) -> None:
    rc, out, verdicts = lint_imports(stand_in, stand_in / "contracts.toml")
    assert verdicts == {cid: "KEPT" for cid in CONTRACTS}, out
    assert rc == 0, out


BREACHES = {
    # case: (importer, imported, the contracts it breaks, what lint-imports says)
    "pipeline imports flows": (
        "pipeline.grid", "flows.demo", {"packages", "stages"}, "pipeline is not allowed to import flows"
    ),
    "models imports pipeline": (
        "models.base", "pipeline.errors", {"packages"}, "models is not allowed to import pipeline"
    ),
    "a stage imports the stage above it": (
        "pipeline.masking.a", "pipeline.sources.a", {"stages", "acyclic"},
        "pipeline.masking is not allowed to import pipeline.sources",
    ),
    "a foundation imports a stage": (
        "pipeline.errors", "pipeline.masking.a", {"stages", "acyclic"},
        "pipeline.errors is not allowed to import pipeline.masking",
    ),
    "a stage imports the CLI": (
        "pipeline.reconstruct.b", "pipeline.cli.a", {"stages", "acyclic"},
        "pipeline.reconstruct is not allowed to import pipeline.cli",
    ),
    "a circle inside a stage": (
        "pipeline.train.a", "pipeline.train.b", {"acyclic"}, "No cycles are allowed in pipeline.train."
    ),
    "a circle inside models": ("models.base", "models.registry", {"acyclic"}, "No cycles are allowed in models."),
}


@pytest.mark.parametrize("case", list(BREACHES))
def test_a_bad_import_breaks_its_contract(stand_in: Path, case: str) -> None:
    importer, imported, broken, message = BREACHES[case]
    _add_import(stand_in, importer, imported)
    rc, out, verdicts = lint_imports(stand_in, stand_in / "contracts.toml")
    assert rc != 0, out
    assert {cid for cid, verdict in verdicts.items() if verdict == "BROKEN"} == broken, out
    assert message in out, out


def test_a_new_module_under_pipeline_needs_a_place_in_the_stage_order(stand_in: Path) -> None:
    _write(stand_in, "pipeline.extra.a", "import pipeline.errors\n")
    rc, out, verdicts = lint_imports(stand_in, stand_in / "contracts.toml")
    assert rc != 0, out
    assert verdicts == {"packages": "KEPT", "stages": "BROKEN", "acyclic": "KEPT"}, out
    assert "- pipeline.extra" in out, out
