#!/usr/bin/env bash
# One call on a lent GPU machine checks the real path and prints a table (at most ~8 minutes).
#
#   bash bench/device_check.sh --make-wheels   # HERE, once: the pure-Python pins into wheels/ (carried)
#   bash bench/device_check.sh --dry-run       # the plan; exits 0 on a machine without a GPU (CI runs it)
#   bash bench/device_check.sh                 # THERE: install the wheels over the machine's torch, then check
#
# The GPU machine reaches no registry and brings its own torch (CUDA) and transformers; what the
# project needs beyond them travels as wheels in wheels/ (64 MiB in all, so torch and vLLM cannot).
# Each part has its own time limit, so a slow part leaves the rest of the table.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=wheels
# pure-Python wheels, and llguidance (abi3: its cp39-abi3 manylinux wheel serves Python 3.12 too);
# other binary packages (pydantic-core, tokenizers, pyyaml) stay the machine's own (issue 25: incomplete)
PINS=(transformers==5.23.0 huggingface_hub==2.4.0 trl==1.16.0 peft==0.21.2 accelerate==1.15.0
      datasets==5.2.0 typer==0.29.1 click==8.5.1 shellingham==1.5.4 annotated-doc==0.0.7 rich==15.0.0
      openai==3.51.0 fastapi==0.163.2 uvicorn==0.54.0 llguidance==1.9.1)
PARTS=(
  "versions|30|python -c 'import torch, transformers, trl; print(torch.__version__, torch.version.cuda, transformers.__version__, trl.__version__, torch.cuda.get_device_name(0))'"
  "tests on CUDA|150|python -m pytest -q -x -m 'not slow' tests/test_models.py tests/test_pretrain.py tests/test_train_sft.py tests/test_prm.py tests/test_sampling.py tests/test_search.py"
  "bf16 SFT/PRM/DPO steps + tokens/s|90|python bench/device_steps.py --bf16"
  "chainstep run (default)|180|python -m chainstep run --out runs/gpu-default"
  "chainstep run --set model.size=small --quick|60|python -m chainstep run --quick --set model.size=small --out runs/gpu-small"
)

case "${1:-}" in
  --make-wheels)
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    pip download -q --no-deps --only-binary=:all: -d "$WHEELS" "${PINS[@]}" || exit 1
    du -sh "$WHEELS"; ls "$WHEELS"; exit 0 ;;
  --dry-run)
    echo "plan (nothing runs):"
    echo "  install: pip install --no-index --no-deps $WHEELS/*.whl over the machine's torch; PYTHONPATH=src"
    for part in "${PARTS[@]}"; do IFS='|' read -r name limit cmd <<< "$part"; printf '  %-44s %4ss  %s\n' "$name" "$limit" "$cmd"; done
    exit 0 ;;
esac

if ! python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "no CUDA device here: run with --dry-run, or on the lent GPU machine"; exit 1
fi
[ -d "$WHEELS" ] && pip install -q --no-index --no-deps "$WHEELS"/*.whl
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" CHAINSTEP_CACHE="$PWD/runs/cache"
mkdir -p runs
declare -a TABLE
for part in "${PARTS[@]}"; do
  IFS='|' read -r name limit cmd <<< "$part"
  start=$(date +%s)
  timeout "$limit" bash -c "$cmd" > "runs/device-$(echo "$name" | tr -c 'a-z0-9' '_').log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  status=$([ $rc -eq 0 ] && echo PASS || { [ $rc -eq 124 ] && echo TIMEOUT || echo "FAIL($rc)"; })
  TABLE+=("$(printf '%-9s %-44s %5ss' "$status" "$name" "$secs")")
  tail -n 8 "runs/device-$(echo "$name" | tr -c 'a-z0-9' '_').log" | sed 's/^/    /'
done
echo; echo "device check:"; printf '%s\n' "${TABLE[@]}"
[ -f runs/gpu-default/metrics.json ] && python -m chainstep report runs/gpu-default > /dev/null && \
  python -c "import json; m=json.load(open('runs/gpu-default/metrics.json')); [print(r['model'], r['strategy'], round(r['accuracy'], 3)) for r in m['results'] if r['strategy'] == 'greedy']"
exit 0
