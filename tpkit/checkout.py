"""Files that ship with tpkit's source checkout, found from any directory: ``assets/`` (the
embedded model, the README's example image) and ``configs/``.

tpkit is installed from its checkout (``pip install -e .``), so these sit beside the package; a
relative path such as ``"assets/tiny-llava"`` would name them only from the checkout's root.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ROOT", "asset", "checkout_path"]

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

