#!/usr/bin/env bash
# Every speed benchmark of the GPU path, at 160m and 410m, into one JSON file.
#
#   bash bench/gpu_check.sh [OUT_DIR]          (default OUT_DIR: .alcot/gpu_check)
#
# Meant for a machine whose python3 already has a CUDA torch and no project virtualenv:
#   PYTHON   the interpreter (default: .venv/bin/python when it exists, else python3); the
#            project is made importable from this checkout without installing it
#   WHEELS   a folder holding a megatron-core wheel (e.g. `pip download --no-deps
#            --only-binary=:all: --python-version 3.12 megatron-core==0.16.1`), installed from
#            there (no index, into OUT_DIR/site) when megatron-core is missing
#   DATA     WikiText-2's training split for bench/train_speed.py
#            (default /work/shared/data/wikitext-2/wiki.train.tokens, or shared/... here)
#   DRY=1    the same steps at CPU size (tiny shapes, a step or two): checks the script and
#            every benchmark's JSON line without a GPU
#   STEP_TIMEOUT  seconds each benchmark may take (default: no limit); one that runs past it
#            is recorded as an error and the next one starts
#   TESTS=0  skip the GPU test files (run last, when pytest is importable)
# The headline benchmarks (model_speed, train_speed, generate_speed) run first at every size,
# then the variants (flex kernel, captured decode graph, skip decoding), then the tests: a
# machine lent for a limited time gets the figures that matter first.
# Writes OUT_DIR/gpu_check.json = {"device", "torch", "cuda", "transformer_engine", "date",
# "runs": {"<benchmark>_<size>": the benchmark's JSON line, or {"error": ...}}}, and each
# benchmark's whole output as OUT_DIR/<benchmark>_<size>.txt. A benchmark that fails is
# recorded as an error and the others still run.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${1:-${OUT:-.alcot/gpu_check}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
py="$PYTHON"

if ! "$py" -c "import torch" 2>/dev/null; then
    echo "gpu_check: $py has no torch (set PYTHON to an interpreter with a CUDA torch)" >&2
    exit 2
fi
# alcot.* importable from the source folders (what the editable install would map)
if ! "$py" -c "import alcot.model.config" 2>/dev/null; then
    shim="$out/.shim/alcot"
    mkdir -p "$shim"
    : >"$shim/__init__.py"
    for part in common model data orchestrator analysis; do ln -sfn "$root/$part" "$shim/$part"; done
    export PYTHONPATH="$out/.shim${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$py" -c "import megatron.core" 2>/dev/null; then
    if [[ -z "${WHEELS:-}" ]]; then
        echo "gpu_check: megatron-core is not installed; set WHEELS to a folder with its wheel" >&2
        exit 2
    fi
    # into a folder of the output (no write access to the interpreter's own site needed)
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$out/site" "$WHEELS"/megatron_core-*.whl
    export PYTHONPATH="$out/site${PYTHONPATH:+:$PYTHONPATH}"
fi

data="${DATA:-/work/shared/data/wikitext-2/wiki.train.tokens}"
[[ -f "$data" ]] || data="$root/shared/data/wikitext-2/wiki.train.tokens"
export ALCOT_HOME="${ALCOT_HOME:-$out/home}"

if [[ "${DRY:-0}" == 1 ]]; then
    sizes=(micro)
    shape() { echo "--size micro --layers 0 --hidden 0 --heads 0 --vocab 0 --seq 64 --batch 2"; }
    model_steps="--warmup 1 --steps 1 --rounds 1 --device cpu --threads 1"
    gen_args="--new 8 --prompt 8 --rounds 1 --batch 2 --device cpu --threads 1"
    train_args="--seq 64 --batch 4 --warmup 1 --steps 2 --vocab 512 --threads 1"
    dtype=fp32
    flex=0
else
    sizes=(160m 410m)
    shape() { echo "--size $1 --layers 0 --hidden 0 --heads 0 --vocab 0 --seq 2048 --batch 8"; }
    model_steps="--warmup 2 --steps 5 --rounds 1"
    gen_args="--new 256 --prompt 32 --rounds 1"
    train_args="--seq 512 --batch 16 --warmup 3 --steps 10 --vocab 8192"
    dtype=bf16
    flex=1
fi

"$py" - <<'PY' >"$out/device.json"
import json, time, torch
te = True
try:
    import transformer_engine  # noqa: F401
except Exception:
    te = False
print(json.dumps({
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    "torch": torch.__version__, "cuda": torch.version.cuda, "transformer_engine": te,
    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
}))
PY
spec=local
"$py" -c "import transformer_engine" 2>/dev/null && spec=te

run() {  # run NAME COMMAND...: keep the whole output and the last line (the JSON line)
    local name="$1"
    shift
    echo "== $name: $*" >&2
    if timeout "${STEP_TIMEOUT:-0}" "$@" >"$out/$name.txt" 2>&1; then
        tail -n 1 "$out/$name.txt" >"$out/$name.json"
    else
        echo "{\"error\": \"exit $?, see $name.txt\"}" >"$out/$name.json"
    fi
}

for size in "${sizes[@]}"; do  # the headline figures first
    # shellcheck disable=SC2046
    run "model_speed_$size" "$py" bench/model_speed.py $(shape "$size") --dtype "$dtype" \
        --spec "$spec" $model_steps
    run "train_speed_$size" "$py" bench/train_speed.py --size "$size" $train_args \
        --data "$data"
    # shellcheck disable=SC2046
    run "generate_speed_$size" "$py" bench/generate_speed.py $(shape "$size") \
        --dtype "$dtype" $gen_args
done
for size in "${sizes[@]}"; do  # then the variants
    if [[ "$flex" == 1 ]]; then
        # shellcheck disable=SC2046
        run "model_speed_flex_$size" "$py" bench/model_speed.py $(shape "$size") \
            --dtype "$dtype" --spec "$spec" --kernel flex $model_steps
        # shellcheck disable=SC2046
        run "generate_speed_graph_$size" "$py" bench/generate_speed.py $(shape "$size") \
            --dtype "$dtype" $gen_args --cuda-graph
    fi
    # shellcheck disable=SC2046
    run "generate_speed_skip_$size" "$py" bench/generate_speed.py $(shape "$size") \
        --dtype "$dtype" $gen_args --decode skip
done

if [[ "${DRY:-0}" != 1 && "${TESTS:-1}" != 0 ]] && "$py" -c "import pytest" 2>/dev/null; then
    # the GPU build's tests
    timeout "${STEP_TIMEOUT:-0}" "$py" -m pytest -q -p no:cacheprovider tests/test_model.py \
        tests/test_generate.py tests/test_precision.py tests/test_latent_cache.py \
        tests/test_mor.py tests/test_host_reads.py 2>&1 | tail -5 >"$out/tests.txt" || true
fi

"$py" - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
runs = {}
for f in sorted(out.glob("*.json")):
    if f.name in ("device.json", "gpu_check.json"):
        continue
    try:
        runs[f.stem] = json.loads(f.read_text())
    except json.JSONDecodeError:
        runs[f.stem] = {"error": f"no JSON line, see {f.stem}.txt"}
result = {**json.loads((out / "device.json").read_text()), "runs": runs}
tmp = out / "gpu_check.json.tmp"
tmp.write_text(json.dumps(result, indent=1) + "\n")
tmp.replace(out / "gpu_check.json")
print(json.dumps(result))
PY
