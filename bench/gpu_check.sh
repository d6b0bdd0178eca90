#!/usr/bin/env bash
# The GPU check of the latent path, as one script (for a machine with CUDA, TransformerEngine
# optional): the model tests on the GPU build, then bench/model_speed.py at 160m in bf16 on the
# TransformerEngine spec (local spec when TE is absent), whose JSON line carries the vanilla MFU
# against a bf16 GEMM measured in the same run, then the memory and decoding benches.
#   bash bench/gpu_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-.alcot/gpu_check}}"
mkdir -p "$out"
py=.venv/bin/python
$py - <<'PY' | tee "$out/device.txt"
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
try:
    import transformer_engine  # noqa: F401
    print("transformer_engine yes")
except Exception as err:
    print("transformer_engine no:", err)
PY
spec=local
$py -c "import transformer_engine" 2>/dev/null && spec=te
$py -m pytest -q tests/test_model.py tests/test_generate.py tests/test_precision.py \
    tests/test_recompute.py tests/test_latent_cache.py tests/test_mor.py 2>&1 | tail -5 | tee "$out/tests.txt"
size=(--size 160m --layers 0 --hidden 0 --heads 0 --vocab 0 --seq 2048 --batch 8)
$py bench/model_speed.py "${size[@]}" --dtype bf16 --spec "$spec" --steps 5 --rounds 1 \
    2>&1 | tee "$out/model_speed_160m_bf16.txt"
$py bench/model_speed.py "${size[@]}" --dtype bf16 --spec "$spec" --kernel flex --steps 5 \
    --rounds 1 2>&1 | tee "$out/model_speed_160m_bf16_flex.txt" || true
$py bench/model_memory.py 2>&1 | tee "$out/model_memory.txt"
$py bench/generate_speed.py --dtype bf16 2>&1 | tee "$out/generate_speed.txt"
