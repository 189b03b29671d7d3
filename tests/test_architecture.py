"""The package structure: no import circle anywhere, and the layers of pyproject.toml's import-linter contracts."""

import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("backbones", "classification", "cifar", "places365", "detection", "benchmarks")


def test_no_import_circle():
    """No module reaches itself through imports, lazy (function-level) imports included."""
    graph = grimp.build_graph(*PACKAGES)
    circles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain:
                circles.append(" -> ".join((module, *chain)))
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_import_contracts_hold():
    """`lint-imports` (import-linter) checks the contracts in pyproject.toml: layers, forbidden imports."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout
