"""The house drawn from its imports: layers that only point down, no cycles, one module per
mode. Checked with import-linter (the contract in pyproject.toml) and grimp's import graph."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

from qtl.apps import APPS
from qtl.config import Mode


def test_import_layers_point_down():
    tool = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(tool)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_no_import_cycles():
    import grimp

    graph = grimp.build_graph("qtl")
    cycles = []
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back is not None:
                cycles.append(" -> ".join([module, *back]))
    assert not cycles, "\n".join(cycles)


def test_every_mode_is_a_small_application():
    assert set(APPS) == set(Mode)
    for mode, name in APPS.items():
        module = importlib.import_module(name)
        assert callable(module.main), mode
        lines = Path(module.__file__).read_text().count("\n")
        assert lines < 200, f"{name} is {lines} lines: an application should only wire boxes"


def test_launch_py_stays_tiny():
    code = [
        x
        for x in (ROOT / "launch.py").read_text().splitlines()
        if x.strip() and not x.lstrip().startswith("#")
    ]
    assert len(code) < 40
