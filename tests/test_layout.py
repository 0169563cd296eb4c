"""The layout's rules, read from every import in the package (functions' imports included).

Two wings over a core: ``core`` imports neither wing nor Lightning, diffusers or transformers; ``nst`` and
``diffusion`` never import each other; only the command line, the Python API and the report import the CLI's
Lightning module; the NST wing never imports diffusers or transformers; and no module-level import makes a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import CONFIGS, REPO

PACKAGE = REPO / "lightning_nst"
HEAVY = ("lightning", "diffusers", "transformers", "accelerate", "jsonargparse")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, *, top_level_only: bool = False) -> Iterator[str]:
    """Every module ``path`` imports (``from a.b import c`` gives ``a.b`` and ``a.b.c``), outside TYPE_CHECKING."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def under(name: str, *prefixes: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def offenders(of: str, forbidden: tuple[str, ...], *, allowed_files: tuple[str, ...] = ()) -> list[str]:
    return [
        f"{name} imports {imported}"
        for name, path in modules().items()
        if under(name, of) and name not in allowed_files
        for imported in imports(path)
        if under(imported, *forbidden)
    ]


def test_the_core_imports_neither_wing_nor_lightning_diffusers_or_transformers() -> None:
    wings = ("lightning_nst.nst", "lightning_nst.diffusion", "lightning_nst.cli", "lightning_nst.report")
    top = ("lightning_nst.api", "lightning_nst.main", "lightning_nst.outputs")
    assert offenders("lightning_nst.core", (*wings, *top, *HEAVY)) == []


def test_the_wings_never_import_each_other() -> None:
    assert offenders("lightning_nst.nst", ("lightning_nst.diffusion",)) == []
    assert offenders("lightning_nst.diffusion", ("lightning_nst.nst",)) == []


def test_the_wings_never_import_the_command_line_or_the_report() -> None:
    above = ("lightning_nst.cli", "lightning_nst.report", "lightning_nst.api", "lightning_nst.main")
    assert offenders("lightning_nst.nst", above) == []
    assert offenders("lightning_nst.diffusion", above) == []


@pytest.mark.parametrize("module", ["lightning_nst.cli.lightning", "lightning_nst.cli.signals"])
def test_only_the_command_line_api_and_report_import_the_clis_lightning_modules(module: str) -> None:
    importers = {name for name, path in modules().items() if any(under(imported, module) for imported in imports(path))}
    allowed = ("lightning_nst.cli", "lightning_nst.api", "lightning_nst.report", "lightning_nst.main")
    assert {name for name in importers if not under(name, *allowed)} == set()
    assert importers, f"nothing imports {module}: the rule reads the wrong module"


def test_the_nst_wing_never_imports_diffusers_or_transformers() -> None:
    assert offenders("lightning_nst.nst", ("diffusers", "transformers")) == []


def test_no_module_level_import_cycle() -> None:
    known = modules()
    graph = {
        name: {imported for imported in imports(path, top_level_only=True) if imported in known and imported != name}
        for name, path in known.items()
    }
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(name) :], name]))
        if name in done:
            return
        for imported in sorted(graph[name]):
            visit(imported, [*stack, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_a_fit_imports_no_diffusers() -> None:
    """The NST path as a run takes it: the CLI's module, the NST wing and the writer, imported in a fresh process.

    Not transformers: Lightning's own import may bring it in where it is installed; the static rule above holds ours.
    """
    code = (
        "import sys, lightning_nst.cli.lightning, lightning_nst.nst.module, lightning_nst.nst.writer, "
        "lightning_nst.nst.checkpoint, lightning_nst.api\n"
        "print(sorted(m for m in ('diffusers',) if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "[]"


def test_import_lightning_nst_imports_no_torch() -> None:
    code = "import sys, lightning_nst\nprint(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "[]"


def _class_paths(value: object) -> Iterator[str]:
    if isinstance(value, dict):
        if isinstance(value.get("class_path"), str):
            yield value["class_path"]
        for item in value.values():
            yield from _class_paths(item)
    elif isinstance(value, list):
        for item in value:
            yield from _class_paths(item)


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_shipped_configs_name_the_packages_top_level_classes(config: Path) -> None:
    """A class moved inside the package never breaks a user's YAML: configs name ``lightning_nst.Class``."""
    import lightning_nst

    paths = list(_class_paths(yaml.safe_load(config.read_text(encoding="utf-8"))))
    ours = [path for path in paths if path.startswith("lightning_nst.")]
    assert [path for path in ours if path.count(".") != 1] == []
    for path in ours:
        assert path.split(".")[1] in lightning_nst.__all__, path


def test_the_public_names_resolve() -> None:
    import lightning_nst

    for name in lightning_nst.__all__:
        assert getattr(lightning_nst, name) is not None, name


def test_the_command_lines_python_entry_points_resolve() -> None:
    """``from lightning_nst.cli import run``, as the README runs a config from Python."""
    from lightning_nst.cli import NSTCLI, InterruptedBySignal, run
    from lightning_nst.cli.lightning import run as defined

    assert run is defined and issubclass(InterruptedBySignal, KeyboardInterrupt) and NSTCLI.__name__ == "NSTCLI"
