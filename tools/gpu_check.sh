#!/usr/bin/env bash
# The GPU check: the vLLM tests and short GRPO fits on CUDA (bf16-mixed, FSDP2 on one device,
# HF generate and, where vLLM is installed, the vLLM engine) with the embedded tiny policy, then
# one summary table. Nothing is downloaded on the GPU machine.
#
#   here, where pip reaches a registry:  bash tools/gpu_check.sh --fetch-wheels
#       puts the pure-Python packages the GPU image lacks (jsonargparse, datasets, math-verify and
#       their missing requirements, versions as installed here) into .whl/ (git-ignored, ~10 MB);
#   on the GPU machine (carry .whl):     bash tools/gpu_check.sh
#       installs .whl/ into /tmp/site when present, runs the checks, writes logs and
#       summary.md to $OUT (or a temporary folder) and prints the table.
#
# bitsandbytes (~70 MB of CUDA kernels) does not fit the carried tree, so the 8-bit paths are not
# part of this check; vLLM for CUDA neither: its tests run only where the image already has it.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
# Names the GPU image lacks (from the device notes' package list), all pure Python.
missing=(jsonargparse docstring-parser typeshed-client datasets dill multiprocess math-verify
    latex2sympy2-extended antlr4-python3-runtime)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p .whl
    for name in "${missing[@]}"; do
        version=$(python -c "import importlib.metadata as m; print(m.version('$name'))") || exit 1
        python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
            --platform any -d .whl "$name==$version" || exit 1
    done
    du -sh .whl
    exit 0
fi

out=${OUT:-$(mktemp -d)}
accelerator=${GPU_CHECK_ACCELERATOR:-gpu}  # cpu: a dry run of this script's plumbing
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$out/gpu.txt" 2>&1
python3 - >"$out/env.txt" 2>&1 <<'EOF'
import importlib.util, torch
print(f"torch {torch.__version__}, cuda available {torch.cuda.is_available()}")
for name in ("vllm", "transformers", "lightning", "bitsandbytes", "jsonargparse", "math_verify"):
    print(name, "installed" if importlib.util.find_spec(name) else "MISSING")
EOF
have_vllm=$(python3 -c "import importlib.util; print(int(importlib.util.find_spec('vllm') is not None))")

declare -A status seconds
run() {  # run NAME COMMAND...: log to $out/NAME.log, record pass/fail and wall seconds
    local name=$1 start=$SECONDS
    shift
    if "$@" >"$out/$name.log" 2>&1; then status[$name]=passed; else status[$name]="FAILED (rc $?)"; fi
    seconds[$name]=$((SECONDS - start))
}

fit() {  # fit NAME [extra CLI args]: 6 GRPO steps of the tiny policy on one GPU under FSDP2
    local name=$1 dir="$out/$1"
    shift
    mkdir -p "$dir"
    sed "s#runs/test#$dir#g" tests/configs/tiny_test.yaml >"$dir/config.yaml"
    run "$name" timeout 900 python3 -m cropi_pl fit --config "$dir/config.yaml" \
        --trainer.default_root_dir="$dir" --trainer.accelerator="$accelerator" --trainer.devices=1 \
        --trainer.precision=bf16-mixed --trainer.max_steps=6 \
        --trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy \
        --trainer.strategy.data_parallel_size=1 --trainer.strategy.tensor_parallel_size=1 "$@"
}

if [[ $have_vllm == 1 ]]; then
    run vllm_tests timeout 1200 python3 -m pytest -q -x -m vllm tests/test_vllm*.py --durations=10
else
    status[vllm_tests]="not run: vLLM is not installed on this machine"
    seconds[vllm_tests]=0
fi
fit fit_hf_fsdp2_bf16
if [[ $have_vllm == 1 ]]; then
    fit fit_vllm_fsdp2_bf16 --config configs/engine/vllm.yaml \
        --model.init_args.engine.init_args.gpu_memory_utilization=0.2 \
        --model.init_args.vllm_importance_sampling_correction=true
else
    status[fit_vllm_fsdp2_bf16]="not run: vLLM is not installed on this machine"
    seconds[fit_vllm_fsdp2_bf16]=0
fi

python3 - "$out" fit_hf_fsdp2_bf16 fit_vllm_fsdp2_bf16 >"$out/fit_metrics.txt" 2>&1 <<'EOF'
import math, sys
from pathlib import Path
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
out = Path(sys.argv[1])
for name in sys.argv[2:]:
    values = {}
    for events in (out / name).rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events)); acc.Reload()
        for tag in acc.Tags()["scalars"]:
            values.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    if not values:
        print(f"{name}: no metrics"); continue
    keys = ["loss", "reward", "sampling/sampling_logp_difference/max", "time/generation_s",
            "time/training_s", "val/targeted/accuracy"]
    parts = []
    for key in keys:
        if key in values:
            v = values[key]
            finite = all(math.isfinite(x) for x in v)
            parts.append(f"{key} last {v[-1]:.4g}{'' if finite else ' NON-FINITE'}")
    print(f"{name}: " + "; ".join(parts))
EOF

{
    echo "GPU: $(cat "$out/gpu.txt")"
    echo
    sed 's/^/    /' "$out/env.txt"
    echo
    echo "| check | result | seconds |"
    echo "|---|---|---|"
    for name in vllm_tests fit_hf_fsdp2_bf16 fit_vllm_fsdp2_bf16; do
        echo "| $name | ${status[$name]} | ${seconds[$name]} |"
    done
    echo
    sed 's/^/    /' "$out/fit_metrics.txt"
    tail -n 3 "$out/vllm_tests.log" 2>/dev/null | sed 's/^/    vllm_tests: /'
} | tee "$out/summary.md"
[[ "${status[fit_hf_fsdp2_bf16]}" == passed ]] && [[ "${status[vllm_tests]}" != FAILED* ]] &&
    [[ "${status[fit_vllm_fsdp2_bf16]}" != FAILED* ]]
