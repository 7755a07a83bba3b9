#!/usr/bin/env bash
# The CUDA checks and the GPU benchmarks in one script, sized for about 15 minutes on one GPU.
#
#   bash benchmarks/run_gpu.sh            # CUDA checks + op benchmark + ResNet-50 eager (~4 min)
#   bash benchmarks/run_gpu.sh compile    # ResNet-50 under torch.compile (~5-8 min)
#
# Results land in $OUT if set (an output folder), else benchmarks/results/
# (JSON), and on stdout (the tables of docs/performance.md).
# dropblock_fx imports pydantic and PyYAML; if the GPU machine's python lacks them and has no
# network, copy them from a local venv of the same Python version and carry the folder:
#   mkdir .gpu_deps && cp -r $VENV/lib/python3.X/site-packages/{pydantic,pydantic_core,\
#     annotated_types,typing_inspection,typing_extensions.py,yaml} .gpu_deps/
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import pydantic, yaml" 2>/dev/null && [[ -d .gpu_deps ]]; then
  export PYTHONPATH="$PYTHONPATH:$PWD/.gpu_deps"
fi
"$PY" -c "import dropblock_fx, triton, torch; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  || { echo "cannot import dropblock_fx (see the header of this script)"; exit 1; }
RES=${OUT:-benchmarks/results}
mkdir -p "$RES"

if [[ "${1:-}" == "compile" ]]; then
  timeout 580 "$PY" benchmarks/bench_resnet50_step.py --compile-only --json "$RES/bench_resnet50_step_compile.json" \
    --variants "ours per-channel" "timm kernel" "drop_block_rate"
  exit $?
fi

# 1. The compiled kernels on CUDA tensors: the interpreter's checks, on the GPU.
timeout 240 "$PY" tests/_triton_interpret_checks.py --device cuda > "$RES/triton_cuda_checks.txt" 2>&1
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
timeout 180 "$PY" benchmarks/bench_op.py --device cuda --dtype bf16 --shape 256 1024 14 14 --channels-last \
  --json "$RES/bench_op_cuda.json"
# 3. ResNet-50 training step, eager (target: <= +12% time, <= +3% peak memory).
timeout 300 "$PY" benchmarks/bench_resnet50_step.py --json "$RES/bench_resnet50_step_eager.json"
