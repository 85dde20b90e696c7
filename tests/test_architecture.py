"""The layering of the package: imports point one way (pyproject.toml's import-linter contract)."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(tree: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(tree / "src"), "PATH": "/usr/bin:/bin"}
    return subprocess.run([str(LINT), "--config", str(tree / "pyproject.toml"), "--no-cache"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_package_keeps_its_layers():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    files = tmp_path / "src" / "cnnlab" / "core" / "files.py"
    # Hidden inside a function, where a reader would not look: the linter still sees it.
    files.write_text(files.read_text() + "\n\ndef _upward():\n    from cnnlab.train import engine  # noqa\n")
    result = lint(tmp_path)
    assert result.returncode != 0
    assert "0 kept, 1 broken" in result.stdout and "cnnlab.core.files -> cnnlab.train.engine" in result.stdout
