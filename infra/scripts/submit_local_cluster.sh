#!/usr/bin/env bash
# Submit jobs.compress to a running Ray cluster: `ray up infra/ray-cluster.yaml` (with
# `ray dashboard infra/ray-cluster.yaml` forwarding port 8265), or `ray start --head` on this machine.
#   infra/scripts/submit_local_cluster.sh input.path=s3://bucket/corpus output.path=s3://bucket/tokens
# Arguments are config overrides (key=value) for the packaged compress.yaml (pipeline/conf/). Environment:
#   RAY_ADDRESS        dashboard address (default http://127.0.0.1:8265)
#   ATR_SUBMISSION_ID  job id to use (default atr-compress-<UTC timestamp>); ids are unique per cluster
#   ATR_CONFIG         config file, relative to the repository root, or a packaged config name (default conf/compress.yaml)
# Exits 0 when the job succeeded, 1 when it failed; the job's last stdout line is its summary JSON.
set -euo pipefail
cd "$(dirname "$0")/../.."

export RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
submission_id="${ATR_SUBMISSION_ID:-atr-compress-$(date -u +%Y%m%dT%H%M%SZ)}"

# A cluster started by Ray 2.60 with a token on disk requires it; the CLI sends it only in token mode.
if [[ -z "${RAY_AUTH_MODE:-}" ]] \
   && [[ -n "${RAY_AUTH_TOKEN:-}" || -n "${RAY_AUTH_TOKEN_PATH:-}" || -s "$HOME/.ray/auth_token" ]]; then
  export RAY_AUTH_MODE=token
fi

# The working directory is uploaded to the cluster (.gitignore'd paths are skipped too); credentials
# are never passed here: nodes read S3 with their own instance profile or environment.
exec ray job submit \
  --submission-id "$submission_id" \
  --working-dir . \
  --runtime-env-json '{"excludes": [".git", ".venv", "demo_output", "bench/results", "*.egg-info"]}' \
  -- python -m jobs.compress --config "${ATR_CONFIG:-conf/compress.yaml}" "$@"
