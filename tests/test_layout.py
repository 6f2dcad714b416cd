"""The layout of src/: a few packages, stacked, importing only downwards (docs/architecture.md).

Read from the source's imports (every `import src.…` and `from src.… import`, inside functions
and type-checking blocks too), so the rule stays true as code moves.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

SRC = ROOT / "src"
# Top to bottom: a package may import itself and any package below it, never one above.
LAYERS = (
    "lb",
    "openai_images",
    "jobs",
    "control",
    "model",
    "delivery",
    "request",
    "lora",
    "inputs",
    "runtime",
)


def package_of(path: Path) -> str:
    return path.relative_to(SRC).parts[0]


def imported_packages(path: Path) -> set[str]:
    """The src packages a module imports, by name."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            if node.module == "src":  # `from src import worker`
                names += [f"src.{alias.name}" for alias in node.names]
    return {name.split(".")[1] for name in names if name.startswith("src.")}


MODULES = sorted(p for p in SRC.rglob("*.py") if p.parent != SRC)


def test_every_module_lives_in_a_named_package():
    assert sorted(p.name for p in SRC.glob("*.py")) == ["__init__.py"]
    assert sorted(p.name for p in SRC.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(LAYERS)
    for package in LAYERS:
        init = SRC / package / "__init__.py"
        tree = ast.parse(init.read_text())
        # One or two lines on what lives there, and nothing else: no re-exports hiding a name's home.
        assert ast.get_docstring(tree), init
        assert len(tree.body) == 1, f"{init}: only a docstring"


@pytest.mark.parametrize("module", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_go_down_the_layers_only(module):
    own = LAYERS.index(package_of(module))
    for package in imported_packages(module):
        assert package in LAYERS, f"{module}: imports src.{package}, which is no package of LAYERS"
        assert LAYERS.index(package) >= own, f"{module} ({LAYERS[own]}) imports src.{package}, above it"


def test_no_source_file_is_ignored_by_git():
    # A root-level output folder's rule (`jobs/`) once matched src/jobs/ too: a fresh clone then
    # lacked its new files.
    paths = [str(p.relative_to(ROOT)) for p in SRC.rglob("*.py")]
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert ignored.stdout.split() == []


def test_the_handler_is_the_entry_point_on_top():
    assert imported_packages(ROOT / "handler.py") <= {"lb", "openai_images", "jobs", "runtime", "model"}


def test_the_checker_sees_an_upward_import(tmp_path):
    # The rule's own check: an import from a lower package of a higher one is named.
    module = tmp_path / "bad.py"
    module.write_text("from src.jobs.worker import Worker\nimport src.runtime.gpu\n")
    assert imported_packages(module) == {"jobs", "runtime"}
