"""Files that ship with tpkit's source checkout, found from any directory: ``assets/`` (the
embedded model, the README's example image) and ``configs/``.

tpkit is installed from its checkout (``pip install -e .``), so these sit beside the package; a
relative path such as ``"assets/tiny-llava"`` would name them only from the checkout's root.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path

__all__ = ["ROOT", "asset", "checkout_path", "tpkit_version"]

ROOT = Path(__file__).resolve().parents[1]  # the checkout: tpkit/ sits in it


def checkout_path(relpath: str) -> Path:
    """``ROOT / relpath``; FileNotFoundError, saying where these files come from, when it is not there."""
    path = ROOT / relpath
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such file or directory; tpkit's assets and configs ship with its source checkout "
            "(git clone it, then pip install -e . there)"
        )
    return path


def asset(name: str) -> Path:
    """``assets/<name>`` of the checkout: ``asset("tiny-llava")`` is the embedded model,
    ``asset("example.png")`` the README's example image."""
    return checkout_path(f"assets/{name}")


def tpkit_version() -> str:
    """tpkit's version, with the checkout's commit when it is a git checkout: ``0.1.0 (git 9dbcb52)``,
    ``(git 9dbcb52, modified)`` when tracked files differ from it."""
    try:
        version = importlib.metadata.version("tpkit")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown version"
    if not (ROOT / ".git").exists():
        return version
    try:
        git = ["git", "-C", str(ROOT)]
        sha = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return version
    if sha.returncode != 0:
        return version
    modified = ", modified" if status.returncode == 0 and status.stdout.strip() else ""
    return f"{version} (git {sha.stdout.strip()}{modified})"
