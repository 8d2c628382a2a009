"""Installing fedssl claims one import name, `fedssl`: the project's folders (common, client,
server, simulations) go into the wheel as its subpackages, as the code imports them."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_only_the_fedssl_package_with_its_presets_and_command(tmp_path):
    pytest.importorskip("setuptools")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, cwd=tmp_path)
    wheel = zipfile.ZipFile(next(tmp_path.glob("fedssl-*.whl")))
    names = wheel.namelist()
    assert {name.split("/")[0] for name in names} == {"fedssl", "fedssl-0.1.0.dist-info"}
    for module in ("fedssl/common/methods/byol.py", "fedssl/client/app.py", "fedssl/server/strategies/fedavg.py",
                   "fedssl/simulations/cli.py", "fedssl/simulations/presets/cifar10-dirichlet.toml"):
        assert module in names
    entry_points = wheel.read("fedssl-0.1.0.dist-info/entry_points.txt").decode()
    assert "fedssl = fedssl.simulations.cli:main" in entry_points


def test_no_module_of_the_project_imports_a_top_level_name_it_does_not_own():
    import ast

    owned = {"common", "client", "server", "simulations"}
    offenders = []
    for folder in ("common", "client", "server", "simulations", "fedssl", "benchmarks", "experiments", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in owned]
    assert offenders == []
