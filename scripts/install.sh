#!/usr/bin/env bash
# Create .venv/ in the repository root and install alcot with pinned dependencies.
#
# torch is installed first and pinned (constraints.txt): a bare `torch` requirement with no torch
# present makes pip fetch a multi-GB CUDA build. Where pip cannot find the pinned CPU build on
# its own, point ALCOT_TORCH_INDEX at a wheel index that has it (e.g. PyTorch's CPU index).
# GPU nodes: install the CUDA build of the same torch version first; this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."

python_bin=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python_bin" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# ALCOT_CONSTRAINTS: another pin file, e.g. without the torch line in an image whose base brings
# its own torch build (infra/docker/Dockerfile.gpu)
constraints=${ALCOT_CONSTRAINTS:-constraints.txt}
torch_pin=$(grep -E '^torch==' constraints.txt)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if [ -n "${ALCOT_TORCH_INDEX:-}" ]; then
        "${pip[@]}" "$torch_pin" --index-url "$ALCOT_TORCH_INDEX"
    else
        "${pip[@]}" "$torch_pin"
    fi
fi
"${pip[@]}" -c "$constraints" -e ".[dev,eval]"
# `lm_eval --model alcot`: lm-eval loads no plugins, so a one-line .pth registers the model name
# in lm-eval's registry whenever lm-eval is imported (alcot/orchestrator/lmeval_plugin.py)
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import alcot.orchestrator.evaluation.lmeval_plugin as p; p.install()" > "$site/alcot-lm-eval.pth"
.venv/bin/python -W ignore -c "import torch, megatron.core; print('alcot installed: torch', torch.__version__)"
