"""A run records the code that made it: fedssl's version, and in a git checkout the commit and
whether tracked Python/TOML files were modified (common/provenance.py)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from fedssl.common.provenance import SOURCE_ROOT, code_version, describe

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="no git")


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


def test_the_commit_and_modified_code_are_recorded_and_only_for_the_checkout_itself(tmp_path):
    repo = tmp_path / "repo"
    (repo / "common").mkdir(parents=True)
    (repo / "common" / "rule.py").write_text("X = 1\n")
    (repo / "README.md").write_text("text\n")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "one")
    head = git(repo, "rev-parse", "HEAD")

    assert code_version(repo) | {"fedssl": None} == {"fedssl": None, "commit": head, "modified": False}
    (repo / "README.md").write_text("other text\n")  # docs do not change results
    assert code_version(repo)["modified"] is False
    (repo / "common" / "rule.py").write_text("X = 2\n")
    assert code_version(repo)["modified"] is True
    assert describe(code_version(repo)) == f"commit {head[:7]} with modified files"
    # an installed copy inside another repository (a venv in a working tree) claims nothing
    assert code_version(repo / "common")["commit"] is None
    assert code_version(tmp_path)["commit"] is None
    assert describe(None).startswith("not recorded")


def test_this_checkout_names_its_own_commit():
    if not (SOURCE_ROOT / ".git").exists():
        pytest.skip("fedssl is not running from a git checkout")
    assert code_version()["commit"] == git(SOURCE_ROOT, "rev-parse", "HEAD")
