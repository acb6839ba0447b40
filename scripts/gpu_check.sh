#!/usr/bin/env bash
# One short GPU slot: the CUDA tests and the GPU benchmark (training-step, speed and sliding-window tables),
# results and logs written to $OUT. Sized for well under 8 minutes on one H200 (each stage time-boxed).
#
# Before the slot, on a machine with network access, from the repository root:
#   /work/shared/tools/gpu-wheels.sh      # fetches monai, pytorch-ignite, nibabel, pydicom, fire into .whl/
# With the device tool (its image has torch + CUDA but no MONAI):
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
# On any CUDA machine with the project installed:
#   OUT=docs/benchmarks/gpu scripts/gpu_check.sh
# Dry run on the CPU (tiny sizes, no autocast):
#   DEVICE=cpu QUICK=1 scripts/gpu_check.sh
#
# Settings (environment variables):
#   DEVICE      cuda (default) or cpu
#   AMP         fp16 on CUDA (default), none on the CPU
#   QUICK       1: --quick sizes and fewer models (a smoke run)
#   OUT         output folder (the device tool sets it; default .ulite_cache/gpu_check)
#   PYTHON      interpreter (default: .venv/bin/python when present, else python3)
#   SITE        where the wheels of .whl/ are installed when MONAI is missing (default /tmp/site)
#   CUDA_TESTS  test files for `pytest -m cuda` (default: tests/test_networks*.py tests/test_triton*.py tests/test_bench*.py)
#   STAGES      which of "tests train speed sw" to run (default: all, in that order; setup always runs)
#   T_SETUP T_TESTS T_TRAIN T_SPEED T_SW   time boxes in seconds per stage
# Outputs in $OUT: benchmark.json, benchmark.md, latency_vs_params.png, training_step.png, environment.txt,
# gpu_check.log. The exit status is non-zero when a stage failed or ran out of time (the others still ran).

set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
if [ "$DEVICE" = cpu ]; then AMP=${AMP:-none}; else AMP=${AMP:-fp16}; fi
OUT=${OUT:-$ROOT/.ulite_cache/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd) || exit 1
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
SITE=${SITE:-/tmp/site}
STAGES=" ${STAGES:-tests train speed sw} "
export PYTHONUNBUFFERED=1 PYTHONUTF8=1 PYTHONDONTWRITEBYTECODE=1

# time boxes (s): on CUDA they add up to 7 minutes 20 s at most; the CPU dry run gets more
if [ "$DEVICE" = cpu ]; then box=600; else box=0; fi
T_SETUP=${T_SETUP:-$(( box ? box : 60 ))}
T_TESTS=${T_TESTS:-$(( box ? box : 70 ))}
T_TRAIN=${T_TRAIN:-$(( box ? box : 80 ))}
T_SPEED=${T_SPEED:-$(( box ? box : 150 ))}
T_SW=${T_SW:-$(( box ? box : 80 ))}

main() {  # everything below, its output also written to $OUT/gpu_check.log (see the end of the file)
failed=0
last_rc=0
summary=()
stage() {  # stage NAME SECONDS COMMAND...: run COMMAND under `timeout`, log and record how it ended
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  echo
  echo "=== [${SECONDS}s] $name (time box ${limit}s)"
  echo "+ $*"
  timeout --kill-after=10 "$limit" "$@"
  last_rc=$?
  local how="ok"
  if [ $last_rc -eq 124 ] || [ $last_rc -eq 137 ]; then how="TIMED OUT"; failed=1
  elif [ $last_rc -ne 0 ]; then how="FAILED (exit $last_rc)"; failed=1; fi
  echo "=== [${SECONDS}s] $name: $how after $(( SECONDS - t0 ))s"
  summary+=("$(printf '%-8s %-18s %4ss' "$name" "$how" "$(( SECONDS - t0 ))")")
}

echo "gpu_check: device $DEVICE, amp $AMP, quick $QUICK, python $PYTHON, out $OUT, $(date -u +%FT%TZ)"

# --- setup: the wheels the GPU image lacks (monai, ignite, nibabel, pydicom, fire), the package from this tree ----
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
need_wheels=0
if ! "$PYTHON" -c "import monai, ignite" 2>/dev/null; then
  need_wheels=1
  export PYTHONPATH=$SITE:$PYTHONPATH
fi
setup() {
  if [ "$need_wheels" = 1 ]; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
      echo "MONAI is not importable and there are no wheels in .whl/: run /work/shared/tools/gpu-wheels.sh on a" \
           "machine with network access and pass carry=[\".whl\"] to the device tool." >&2
      return 3
    fi
    echo "installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into $SITE"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      .whl/*.whl || return 4
  fi
  "$PYTHON" - <<'PY'
import sys
import torch, monai
import ulite_monai.bench.cli  # noqa: F401  (the package from this working tree)
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), monai {monai.__version__},"
      f" CUDA available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
PY
}
export PYTHON need_wheels SITE
export -f setup
stage setup "$T_SETUP" bash -c setup
if [ $last_rc -ne 0 ]; then
  echo "gpu_check: setup failed; nothing else can run." >&2
  printf '  %s\n' "${summary[@]}"
  exit 1
fi

# --- environment: what the figures were measured on (read-only queries) ---------------------------------------
{
  echo "# gpu_check environment, $(date -u +%FT%TZ)"
  uname -a
  nproc
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu \
      --format=csv
  else
    echo "no nvidia-smi"
  fi
  "$PYTHON" -m pip list 2>/dev/null | grep -iE '^(torch|monai|pytorch-ignite|numpy|triton|onnx|onnxruntime|nibabel|pydicom) ' \
    || true
  echo "PYTHONPATH=$PYTHONPATH"
} > "$OUT/environment.txt" 2>&1
head -n 20 "$OUT/environment.txt"

# --- the CUDA tests (skipped without a GPU) ------------------------------------------------------------------------
read -r -a tests <<< "${CUDA_TESTS:-$(ls tests/test_networks*.py tests/test_triton*.py tests/test_bench*.py 2>/dev/null | tr '\n' ' ')}"
cuda_tests() {
  "$PYTHON" -m pytest -m cuda -q -rs --disable-warnings -p no:cacheprovider "$@"
  local rc=$?
  if [ "$rc" -eq 5 ]; then echo "no test marked 'cuda' was collected"; return 0; fi
  return "$rc"
}
export -f cuda_tests
[[ $STAGES == *" tests "* ]] && stage tests "$T_TESTS" bash -c 'cuda_tests "$@"' cuda_tests "${tests[@]}"

# --- the benchmark: training step, speed, sliding window (each stage adds its table to benchmark.json) ------------
bench=("$PYTHON" -m ulite_monai.bench --device "$DEVICE" --amp "$AMP" --out "$OUT" --update)
if [ "$QUICK" = 1 ]; then
  train_args=(--quick --train-workloads 2d bundle --train-models ulite ulite-cl monai-unet)
  speed_args=(--quick --dims 2 --models ulite-fused monai-unet --no-train)
  sw_args=(--quick --sw-no-sweep)
else
  train_args=(--train-models ulite ulite-triton monai-unet monai-unet-cl --train-repeats 20)
  speed_args=(--models ulite ulite-default ulite-fused ulite-fused-nchw monai-unet segresnet basicunet attentionunet unetr swinunetr
              classic-unet --repeats 20 --repeats-3d 10)
  sw_args=(--sw-grid --sw-roi 64 96 128 --sw-batch 1 2 4 8 --sw-overlap 0.25 --sw-repeats 3)
fi
rm -f "$OUT/benchmark.json"  # --update keeps only what this run's stages measured
[[ $STAGES == *" train "* ]] && stage train "$T_TRAIN" "${bench[@]}" --modes train "${train_args[@]}"
[[ $STAGES == *" speed "* ]] && stage speed "$T_SPEED" "${bench[@]}" --modes speed "${speed_args[@]}"
[[ $STAGES == *" sw "* ]] && stage sw "$T_SW" "${bench[@]}" --modes sw "${sw_args[@]}"

# --- summary (the end of the output is what a device run returns) -------------------------------------------------
echo
echo "=== gpu_check done in ${SECONDS}s"
printf '  %s\n' "${summary[@]}"
if [ -f "$OUT/benchmark.json" ]; then
  "$PYTHON" - "$OUT/benchmark.json" <<'EOF' || true
import json, sys

r = json.load(open(sys.argv[1]))
g = r["environment"].get("cuda_device") or {}
print(f"device {r['environment'].get('device')}" + (f" ({g['gpu']})" if g else "") + f", amp {r['environment'].get('amp')}")
for wl in (r.get("training_step") or {}).get("workloads", []):
    cells = ", ".join(f"{x['label']} {x['step']['median_ms']:.1f} ms" for x in wl["results"] if x.get("step"))
    ratios = ", ".join(f"{q['model']}/{q['versus']} {q['speedup']:.2f}x" for q in wl["ratios"])
    print(f"train {wl['name']} {'x'.join(map(str, wl['input_shape']))}: {cells}; speed-up {ratios}")
for q in (r.get("speed") or {}).get("ratios", []):
    print(f"speed {q['dims']}D: {q['meaning']}: {q['speedup']:.2f}x")
for x in (r.get("speed") or {}).get("results", []):
    if x.get("throughput_per_s"):
        print(f"speed {x['dims']}D bs{x['throughput_batch']}: {x['label']} {x['throughput_per_s']:.0f} img/s")
for k, v in ((r.get("sliding_window") or {}).get("best") or {}).items():
    print(f"sw best {k}: roi {v['roi'][0]}, sw_batch {v['sw_batch_size']}, overlap {v['overlap']}: {v['wall_s']:.3f} s")
EOF
fi
ls -la "$OUT"
return $failed
}

main 2>&1 | tee -a "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
