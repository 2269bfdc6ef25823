"""Every TUI test runs with its own XDG config and data dirs, so recordings and user themes never touch the real
home. The cache dir stays shared so the integration test reuses the converted default model."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
