#!/usr/bin/env bash
# The CUDA checks and the GPU benchmarks in one script, sized for a short lease of one GPU.
#
#   bash benchmarks/run_gpu.sh            # CUDA checks + op benchmark + ResNet-50 eager (~4 min)
#   bash benchmarks/run_gpu.sh compile    # ResNet-50 under torch.compile (~4-6 min)
#   bash benchmarks/run_gpu.sh all        # both, in that order
#
# EAGER_VARIANTS / COMPILE_VARIANTS: substrings of the variant names to run, comma-separated
# (COMPILE_VARIANTS="ours per-channel,apply_dropblock"); default: all eager, four compiled.
# DEADLINE_S=400 bash benchmarks/run_gpu.sh all: every step is cut so that the whole script
# ends within 400 seconds (the benchmarks write their JSON after every variant, so a step
# cut short keeps what it measured).
#
# Results land in $OUT if set (an output folder), else benchmarks/results/
# (JSON), and on stdout (the tables of docs/performance.md).
# dropblock_fx imports pydantic and PyYAML; if the GPU machine's python lacks them and has no
# network, bring wheels and install them first, e.g. into a folder on PYTHONPATH:
#   pip install --no-index --no-deps --target /tmp/site wheels/*.whl && export PYTHONPATH=/tmp/site
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
START=$(date +%s)
END=$((START + ${DEADLINE_S:-100000}))
MODE=${1:-eager}
exec 3>&1  # the steps' own lines go to stdout even when a step's output is redirected

# timeout for a step: at most $1 seconds, and never past the deadline (0: skip the step)
budget() {
  local left=$((END - $(date +%s) - 5))
  local t=$(( left < $1 ? left : $1 ))
  echo $(( t < 20 ? 0 : t ))
}
step() {  # step NAME MAX_SECONDS command...
  local name=$1 t
  t=$(budget "$2")
  shift 2
  if [[ $t == 0 ]]; then echo "== $name: skipped (deadline)" >&3; return 0; fi
  echo "== $name (at most ${t}s, $(( $(date +%s) - START ))s in)" >&3
  timeout "$t" "$@"
  local rc=$?
  [[ $rc == 124 ]] && echo "== $name: cut at ${t}s" >&3
  return 0
}

"$PY" -c "import dropblock_fx, triton, torch, timm, torchvision; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())" \
  || { echo "cannot import dropblock_fx (see the header of this script)"; exit 1; }
IFS=',' read -r -a EV <<< "${EAGER_VARIANTS:-}"
EAGER_SEL=()
[[ ${#EV[@]} -gt 0 ]] && EAGER_SEL=(--variants "${EV[@]}")
IFS=',' read -r -a COMPILE_SEL <<< "${COMPILE_VARIANTS:-ours per-channel,apply_dropblock,timm kernel per-channel,drop_block_rate}"
RES=${OUT:-benchmarks/results}
mkdir -p "$RES"

if [[ $MODE == eager || $MODE == all ]]; then
  # 1. The compiled kernels on CUDA tensors: the interpreter's checks, on the GPU.
  step "CUDA checks" 240 "$PY" tests/_triton_interpret_checks.py --device cuda > "$RES/triton_cuda_checks.txt" 2>&1
  RES="$RES" "$PY" - <<'PYEOF'
import json, os
text = open(os.path.join(os.environ["RES"], "triton_cuda_checks.txt")).read()
if "RESULTS " not in text:
    print("cuda checks crashed:\n" + text[-3000:])
else:
    r = json.loads(text.split("RESULTS ", 1)[1].splitlines()[0])
    bad = [k for k, v in r.items() if not v["ok"]]
    print(f"cuda checks: {len(r) - len(bad)}/{len(r)} ok", bad)
    for k in bad:
        print(r[k]["error"])
PYEOF
  # 2. The op against its anchors (target: per-channel fwd+bwd within 1.3x of F.dropout).
  step "op, bf16 channels_last" 120 "$PY" benchmarks/bench_op.py --device cuda --dtype bf16 --shape 256 1024 14 14 \
    --channels-last --reps 20 --json "$RES/bench_op_cuda.json"
  step "op, fp32 contiguous" 90 "$PY" benchmarks/bench_op.py --device cuda --dtype fp32 --shape 256 1024 14 14 \
    --reps 20 --json "$RES/bench_op_cuda_fp32.json"
  # 3. Each kernel against the copy floor and F.dropout, block sizes and warps, host time per call.
  step "kernels" 90 "$PY" benchmarks/bench_kernels_gpu.py --json "$RES/bench_kernels_gpu.json"
  # 4. ResNet-50 training step, eager (target: <= +12% time, <= +3% peak memory), with a
  #    profile of the baseline and of the paper placement (kernels and launch gaps per step).
  step "ResNet-50 eager" 300 "$PY" benchmarks/bench_resnet50_step.py --json "$RES/bench_resnet50_step_eager.json" \
    --warmup 6 --steps 20 "${EAGER_SEL[@]}" \
    --profile baseline "ours per-channel" "apply_dropblock"
fi
if [[ $MODE == compile || $MODE == all ]]; then
  # 5. ResNet-50 under torch.compile (target: <= +5% time); the warm-up column is the compile
  #    time, every variant compiled cold (no inductor cache shared between them).
  TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 step "ResNet-50 compile" 580 "$PY" benchmarks/bench_resnet50_step.py --compile-only \
    --json "$RES/bench_resnet50_step_compile.json" --warmup 2 --steps 20 \
    --variants "${COMPILE_SEL[@]}"
fi
echo "== done in $(( $(date +%s) - START ))s"
