#!/usr/bin/env bash
# bench.gpu on a GPU host whose Python has torch, torchvision, transformers, pyarrow, pillow and fsspec but not
# the rest of atr's needs. The local executor needs no Ray, so three pure-Python wheels are all it lacks.
#
#   bash bench/gpu_host.sh fetch            # where pip can download: the wheels into .whl/
#   bash bench/gpu_host.sh run [ARGS...]    # on the GPU host, from the repository root, with .whl/ beside it
#
# `run` installs the wheels into a private folder (nothing in the host's Python changes), runs
# `python3 -m bench.gpu ARGS`, and, when $OUT is set (a remote runner's folder that comes back), copies the
# results, the updated docs/benchmarks.md and the log there.
set -euo pipefail

WHEELS=(omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 braceexpand==0.1.7)
SITE=${ATR_GPU_SITE:-/tmp/atr-site}

case "${1:-}" in
fetch)
    mkdir -p .whl
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d .whl "${WHEELS[@]}"
    ls .whl
    ;;
run)
    shift
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "no wheels in .whl/: run 'bash bench/gpu_host.sh fetch' where pip can download, and bring .whl/ along" >&2
        exit 2
    fi
    python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 - <<'PY'
from importlib import metadata
import torch
installed = {d.metadata["Name"].lower(): d.version for d in metadata.distributions()}
print("torch", torch.__version__, "| cuda", torch.cuda.is_available(),
      *(f"| {name} {installed.get(name, 'missing')}" for name in ("torchvision", "transformers", "pyarrow")))
PY
    status=0
    python3 -m bench.gpu "$@" 2>&1 | tee "${OUT:-/tmp}/bench-gpu.log" || status=$?
    if [[ -n "${OUT:-}" ]]; then
        cp bench/results/gpu.json docs/benchmarks.md "$OUT"/ 2>/dev/null || true
    fi
    exit "$status"
    ;;
*)
    echo "usage: bash bench/gpu_host.sh fetch | run [bench.gpu arguments]" >&2
    exit 2
    ;;
esac
