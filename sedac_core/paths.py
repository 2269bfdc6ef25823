"""Where SEDAC Chat keeps its files: caches (converted models, built kernels), data (sessions, profiles) and
config (config.yaml, user themes). The XDG_* variables are respected."""

from __future__ import annotations

import os
from pathlib import Path

APP = "sedac-chat"


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    base = Path(value) if value else Path.home() / fallback
    return base / APP


def cache_dir() -> Path:
    return _xdg("XDG_CACHE_HOME", ".cache")


def data_dir() -> Path:
    return _xdg("XDG_DATA_HOME", ".local/share")


def config_dir() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config")


def sessions_dir() -> Path:
    return data_dir() / "sessions"


def models_cache_dir() -> Path:
    return cache_dir() / "models"


def bundled_dir(package_file: str, root_name: str, packaged_name: str, marker: str) -> Path:
    """Where a folder that DESIGN.md keeps at the repository root (ext/, themes/) is: the root of a checkout (an
    editable install), or inside the package in an installed wheel (pyproject.toml maps it there)."""
    here = Path(package_file).resolve().parent
    for candidate in (here.parent / root_name, here / packaged_name):
        if (candidate / marker).exists():
            return candidate
    return here.parent / root_name
