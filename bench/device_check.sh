#!/usr/bin/env bash
# One call on a lent GPU machine checks the real path and prints a table (at most ~8 minutes).
#
#   bash bench/device_check.sh --make-wheels    # HERE, once: wheels/ = what the GPU image lacks (carried)
#   bash bench/device_check.sh --check-wheels   # the GPU image + bench/gpu_wheels.txt cover chainstep (CI)
#   bash bench/device_check.sh --dry-run        # the plan; exits 0 on a machine without a GPU (CI runs it)
#   bash bench/device_check.sh                  # THERE: install the wheels into the torch Python, check
#
# The GPU machine reaches no registry and brings its own torch (CUDA) and transformers; what the
# project needs beyond its image (bench/gpu_image.txt), or at other versions, travels as wheels
# (bench/device_wheels.py works it out: bench/gpu_wheels.txt, ~44 MiB of the 64 that travel).
# They go in with `python -m pip` (the `pip` on that PATH belongs to another interpreter), and the
# check stops at once unless every carried package then imports at its pinned version. Each part
# has its own time limit, so a slow part leaves the rest of the table; logs and the table land in
# $OUT/device when the device tool sets OUT (it brings that folder back), else runs/device.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=wheels
LOGS="${OUT:-runs}/device"
PARTS=(
  "versions|30|python -c 'import torch, transformers, trl; print(torch.__version__, torch.version.cuda, transformers.__version__, trl.__version__, torch.cuda.get_device_name(0))'"
  "tests on CUDA|120|python -m pytest -q -x -m 'not slow' tests/test_models.py tests/test_pretrain.py tests/test_train_sft.py tests/test_prm.py tests/test_sampling.py tests/test_search.py"
  "bf16 SFT/PRM/DPO steps + tokens/s|90|python bench/device_steps.py --bf16"
  "chainstep run (default)|150|python -m chainstep run --out runs/gpu-default"
  "chainstep run --config configs/gpu.yaml|150|python -m chainstep run --config configs/gpu.yaml --out runs/gpu-profile"
)

case "${1:-}" in
  --make-wheels)
    rm -rf "$WHEELS" && python bench/device_wheels.py make; exit $? ;;
  --check-wheels)
    python bench/device_wheels.py check; exit $? ;;
  --dry-run)
    echo "plan (nothing runs):"
    echo "  install: python -m pip install --no-index --no-deps $WHEELS/*.whl into the torch Python; PYTHONPATH=src"
    echo "  verify:  python bench/device_wheels.py verify (stop unless every carried package is at its pin)"
    for part in "${PARTS[@]}"; do IFS='|' read -r name limit cmd <<< "$part"; printf '  %-44s %4ss  %s\n' "$name" "$limit" "$cmd"; done
    echo "  logs and table: $LOGS"
    exit 0 ;;
esac

if ! python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "no CUDA device here: run with --dry-run, or on the lent GPU machine"; exit 1
fi
mkdir -p "$LOGS"
if ! ls "$WHEELS"/*.whl > /dev/null 2>&1; then
  echo "no wheels in $WHEELS/: run --make-wheels here first and carry wheels/" | tee "$LOGS/summary.txt"; exit 1
fi
python -m pip install -q --no-index --no-deps "$WHEELS"/*.whl 2>&1 | tail -n 5 > "$LOGS/install.log"
if ! python bench/device_wheels.py verify > "$LOGS/verify.log" 2>&1; then
  echo "the carried wheels did not install at their pins:" | tee "$LOGS/summary.txt"
  tee -a "$LOGS/summary.txt" < "$LOGS/verify.log"; cat "$LOGS/install.log"; exit 1
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" CHAINSTEP_CACHE="$PWD/runs/cache"
mkdir -p runs
declare -a TABLE
for part in "${PARTS[@]}"; do
  IFS='|' read -r name limit cmd <<< "$part"
  start=$(date +%s)
  log="$LOGS/$(echo "$name" | tr -c 'a-z0-9' '_').log"
  timeout "$limit" bash -c "$cmd" > "$log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  status=$([ $rc -eq 0 ] && echo PASS || { [ $rc -eq 124 ] && echo TIMEOUT || echo "FAIL($rc)"; })
  TABLE+=("$(printf '%-9s %-44s %5ss' "$status" "$name" "$secs")")
  tail -n 8 "$log" | sed 's/^/    /'
done
echo; echo "device check:" | tee "$LOGS/summary.txt"; printf '%s\n' "${TABLE[@]}" | tee -a "$LOGS/summary.txt"
[ -f runs/gpu-default/metrics.json ] && python -m chainstep report runs/gpu-default > /dev/null && \
  python -c "import json; m=json.load(open('runs/gpu-default/metrics.json')); [print(r['model'], r['strategy'], round(r['accuracy'], 3)) for r in m['results'] if r['strategy'] == 'greedy']"
exit 0
