"""Which code made a run: the installed fedssl's version and, where fedssl runs from a git
checkout, the commit and whether tracked Python or TOML files differ from it.

summary.json records it, so a sweep report can name the commit its numbers come from and
flag runs made by different code: a default or a rule changed between sessions changes
results without changing any recorded setting."""
from __future__ import annotations

import subprocess
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

# The checkout's root in a development install: common/ sits directly in it.
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def fedssl_version() -> str:
    try:
        return package_metadata.version("fedssl")
    except package_metadata.PackageNotFoundError:
        return "unknown"


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version(root: Path = SOURCE_ROOT) -> dict[str, Any]:
    """{"fedssl": version, "commit": sha or None, "modified": bool or None}. The commit only
    where `root` is itself the top of a git checkout: an installed copy inside some other
    repository (a venv in a working tree) must not claim that repository's commit."""
    top = _git(root, "rev-parse", "--show-toplevel")
    commit = _git(root, "rev-parse", "HEAD") if top and Path(top).resolve() == root.resolve() else None
    modified = None
    if commit is not None:
        changed = _git(root, "status", "--porcelain", "--untracked-files=no", "--", "*.py", "*.toml")
        modified = None if changed is None else bool(changed)
    return {"fedssl": fedssl_version(), "commit": commit, "modified": modified}


def describe(code: dict[str, Any] | None) -> str:
    """One line for a report: 'commit 7f3d6b1', '... with modified files', or why it is unknown."""
    if not code:
        return "not recorded (made before fedssl recorded its code)"
    if not code.get("commit"):
        return f"fedssl {code.get('fedssl', 'unknown')}, not from a git checkout"
    return f"commit {code['commit'][:7]}" + (" with modified files" if code.get("modified") else "")
