"""A regular (non-editable) install works like a checkout: the wheel carries ext/'s kernel sources and the themes,
and the code finds them inside the installed packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sedac_core.kernels import CPU_SOURCES, CUDA_SOURCES
from sedac_core.matmul import GEMM_SOURCES
from sedac_core.paths import bundled_dir

ROOT = Path(__file__).resolve().parents[2]


def test_bundled_dir_prefers_the_checkout_then_the_package(tmp_path):
    pkg = tmp_path / "site" / "sedac_core"
    (pkg / "_ext").mkdir(parents=True)
    module = pkg / "kernels.py"
    module.write_text("")
    (pkg / "_ext" / "stats_common.h").write_text("")
    assert bundled_dir(str(module), "ext", "_ext", "stats_common.h") == (pkg / "_ext").resolve()
    (tmp_path / "site" / "ext").mkdir()  # a root-level folder without the marker is someone else's
    assert bundled_dir(str(module), "ext", "_ext", "stats_common.h") == (pkg / "_ext").resolve()
    (tmp_path / "site" / "ext" / "stats_common.h").write_text("")  # a checkout: ext/ beside the package
    assert bundled_dir(str(module), "ext", "_ext", "stats_common.h") == (tmp_path / "site" / "ext").resolve()


def test_wheel_carries_the_kernel_sources_and_themes(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout and sees nothing stale there
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", ".venv",
                                                               "gpu-check", "*.so", "*.o"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("sedac_chat-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for src in {*CPU_SOURCES, *CUDA_SOURCES, *GEMM_SOURCES}:
        assert f"sedac_core/_ext/{src}" in names, src
    themes = {p.name for p in (ROOT / "themes").glob("*.yaml")}
    assert themes and {f"sedac_tui/_themes/{t}" for t in themes} <= names
