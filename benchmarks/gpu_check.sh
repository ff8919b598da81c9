#!/usr/bin/env bash
# The GPU check of issue 20, end to end in one call of the device machine (one H200, 16
# cores, no network, 10 minutes a command): it sets up the Python environment from carried
# wheels, runs gpu_throughput.py at full size with every variant, the CUDA-only tests and a
# 200-step bf16 distillation of the Cityscapes recipe, and writes ONE results file, a
# section ready to append to benchmarks/RESULTS.md, with the four criteria of issue 20
# read off.
#
# Here, first (fills the git-ignored .whl/ with what that machine lacks, about 3 MB):
#
#     make gpu-wheels
#
# Then the device tool's call, from a session whose task has a machine (the tree that
# travels is that session's checkout: run make gpu-wheels there; the machine's copy has
# no .git, so write the commit, `git rev-parse --short HEAD`, into the command):
#
#     run(command='GPU_CHECK_COMMIT=<commit> bash benchmarks/gpu_check.sh "$OUT"',
#         carry=[".whl"], timeout_s=560)
#
# One call, about 6 to 9 minutes of the 15 a session has; give_back after it. What comes
# back: gpu_check.md (the results) and gpu_check.log (every step's whole output); the
# reply's output_tail ends with each step's status and the criteria. Append:
#
#     cat <files_at>/gpu_check.md >> benchmarks/RESULTS.md
#
# then put the figures into the answer of "GPU throughput of a distillation step" near the
# top of RESULTS.md.
#
# The machine's own python3 holds torch 2.11 (cu130), torchvision, timm, huggingface_hub,
# safetensors, numpy, pillow, matplotlib, tqdm and pytest (/work/.library/device/KINDS.md);
# CUDA torch wheels would not fit the 64 MiB carry anyway. So only
# segmentation-models-pytorch travels (.whl/, installed with --no-index --no-deps into a
# folder of its own), timm as a fallback (.whl/fallback/, installed only where missing),
# and kdnb runs from this tree (PYTHONPATH), with no build.
#
# Steps, each under its own limit (`timeout`; less when the whole budget runs short), so a
# hung step costs its own time only and the next one still runs; the results file is
# rewritten after every step, so a call stopped at its limit still returns what was done:
#   environment  the wheels, then the versions, the device and nvidia-smi's reading
#   tests        pytest -m gpu on the test files that mark tests gpu (skipped on a CPU)
#   throughput   gpu_throughput.py: the paper pair at 512x1024, batch 8, every variant but
#                kdnb-compile, both loss tables (K = 19, 150), the profile
#   probe        gpu_distill_probe.py: 200 bf16 steps of configs/cityscapes-student-r18.json
#                from DeepLabV3-R101 (nfd=1,fakd): steps/s and peak memory
#   compile      gpu_throughput.py --variants kdnb kdnb-compile: compilation can take
#                minutes, so it runs last, with the time left
#
# Usage: benchmarks/gpu_check.sh [--dry-run] [OUTDIR]
#   OUTDIR: where gpu_check.md and gpu_check.log go (default $OUT, else
#           benchmarks/gpu_check_out).
#   --dry-run (or GPU_CHECK_DRY_RUN=1): every step on the CPU at reduced sizes (the quick
#           modes, the tests collected but not run, no wheel installed), in under a minute;
#           tests/test_benchmarks.py runs it. Its numbers mean nothing.
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET (seconds for all steps; default
#   530, inside the call's timeout_s of 560), GPU_CHECK_COMMIT (the commit to record).
set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
DRY=${GPU_CHECK_DRY_RUN:-0}
OUTDIR=
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -u/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) OUTDIR=$arg ;;
  esac
done
OUTDIR=${OUTDIR:-${OUT:-$REPO/benchmarks/gpu_check_out}}
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd) || exit 2
RESULTS=$OUTDIR/gpu_check.md
LOG=$OUTDIR/gpu_check.log
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-530}
START=$(date +%s)
# The work folder stays outside OUTDIR: only the two files travel back.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kdnb-gpu-check.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
SITE=$WORK/site
export DRY PY SITE
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg KDNB_DATA=$WORK/data
export PYTHONPATH=$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}
: > "$LOG"
{
  echo "mode=$([ "$DRY" = 1 ] && echo dry-run || echo gpu)"
  echo "date=$(date +%F)"
  echo "commit=${GPU_CHECK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"
  echo "command=bash benchmarks/gpu_check.sh$([ "$DRY" = 1 ] && echo ' --dry-run')"
} > "$WORK/meta"

if ! command -v timeout > /dev/null; then  # coreutils' timeout missing: no limits, said so
  echo "gpu_check.sh: no 'timeout' command here: the steps run without their limits" >&2
  timeout() { shift 3; "$@"; }  # drops "-k 10 LIMIT"
fi

report() {
  "$PY" "$REPO/benchmarks/gpu_check_report.py" "$WORK" "$RESULTS" "$@" \
    || echo "gpu_check.sh: could not write $RESULTS" >&2
}

# run_step NAME LIMIT SHOWN COMMAND...: COMMAND under `timeout` for at most LIMIT seconds
# (fewer when the budget runs short; skipped under 15), its output to $WORK/NAME.log;
# SHOWN is the command as the results file names it.
run_step() {
  local name=$1 want=$2 shown
  shown=$(tr -s ' ' <<< "$3")
  shift 3
  local left=$(( START + BUDGET - $(date +%s) - 10 ))
  local limit=$(( want < left ? want : left ))
  echo "$shown" > "$WORK/$name.cmd"
  if (( limit < 15 )); then
    printf '%s\tskipped\t-\t0\t%s\n' "$name" "$want" >> "$WORK/steps"
    echo "[$name] skipped: $left s left of the budget"
    report
    return
  fi
  echo "[$name] $shown (at most $limit s)"
  local t0 rc status=ok
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$WORK/$name.log" 2>&1 < /dev/null
  rc=$?
  local seconds=$(( $(date +%s) - t0 ))
  if (( rc == 124 || rc == 137 )); then status="timed out"; elif (( rc != 0 )); then status=failed; fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$seconds" "$limit" >> "$WORK/steps"
  { echo "===== $name: $status (exit $rc, $seconds s of $limit): $shown"; cat "$WORK/$name.log"
    echo; } >> "$LOG"
  echo "[$name] $status (exit $rc) in $seconds s"
  report
}

# The environment: the carried wheels (none on a dry run), then what the steps will use.
setup_environment() {
  shopt -s nullglob
  local wheels=(.whl/*.whl) fallback=(.whl/fallback/*.whl) w name
  if [ "$DRY" = 1 ]; then
    echo "dry run: nothing installed; on the GPU machine: ${wheels[*]:-no wheels in .whl/}" \
         "${fallback[*]:+(fallback, where missing: ${fallback[*]})}"
  elif (( ${#wheels[@]} )); then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "${wheels[@]}" || return 1
    echo "installed into $SITE: ${wheels[*]}"
    for w in "${fallback[@]}"; do
      name=$(basename "$w"); name=${name%%-*}
      if "$PY" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$name" 2>/dev/null
      then echo "$name: the machine's own (fallback wheel not needed)"
      else
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
          "$w" || return 1
        echo "installed the fallback $w"
      fi
    done
  else
    echo "no wheels in .whl/: run 'make gpu-wheels' here and carry .whl"
  fi
  "$PY" - <<'EOF' || return 1
import importlib.metadata as metadata
import os
import platform
import sys

print(f"python: {platform.python_version()} ({sys.executable})")
import torch

print(f"torch: {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
      f"{torch.backends.cudnn.version()}, {torch.get_num_threads()} CPU threads")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, compute capability {props.major}.{props.minor}, "
          f"{props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")
else:
    print("device: CPU only (CUDA is not available)")
for name in ("torchvision", "segmentation-models-pytorch", "timm", "huggingface-hub",
             "safetensors", "numpy", "pillow", "matplotlib", "tqdm", "pytest"):
    try:
        print(f"{name}: {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"{name}: MISSING")
import segmentation_models_pytorch  # noqa: F401
import kdnb

print(f"kdnb: {kdnb.__version__} ({kdnb.__file__})")
if not torch.cuda.is_available() and os.environ["DRY"] != "1":
    sys.exit("no CUDA device: the steps that follow run at CPU sizes")
EOF
  if command -v nvidia-smi > /dev/null; then  # reads the card's state; changes nothing
    nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv
  fi
}
export -f setup_environment

GPU_TESTS=$(grep -l "pytest.mark.gpu" tests/test_*.py | tr '\n' ' ')
VARIANTS=(reference-fp32 reference-grad kdnb-fp32 kdnb-bf16 kdnb kdnb-cudnn-benchmark kdnb-loader)
QUICK=() LOSS_QUICK=() COLLECT=() COMPILED=(kdnb kdnb-compile)
if [ "$DRY" = 1 ]; then  # quick modes, one step per timed window, the tests collected only
  QUICK=(--quick --steps 1) LOSS_QUICK=(--loss-steps 1) COLLECT=(--collect-only)
  COMPILED=(kdnb)  # compiling on a CPU takes minutes: the dry run times kdnb alone
fi

run_step environment 60 "pip install --no-index --no-deps --target SITE .whl/*.whl; python (versions)" \
  bash -c setup_environment
# shellcheck disable=SC2086  # GPU_TESTS: file names without spaces
run_step tests 90 "python -m pytest -m gpu ${COLLECT[*]} $GPU_TESTS" \
  "$PY" -m pytest -q -rA -p no:cacheprovider -m gpu "${COLLECT[@]}" $GPU_TESTS
run_step throughput 270 "python benchmarks/gpu_throughput.py ${QUICK[*]} ${LOSS_QUICK[*]} --variants ${VARIANTS[*]} --profile" \
  "$PY" benchmarks/gpu_throughput.py "${QUICK[@]}" "${LOSS_QUICK[@]}" --variants "${VARIANTS[@]}" --profile \
  --out "$WORK/throughput.md"
run_step probe 90 "python benchmarks/gpu_distill_probe.py ${QUICK[*]}" \
  "$PY" benchmarks/gpu_distill_probe.py "${QUICK[@]}" --out "$WORK/probe.md"
run_step compile 300 "python benchmarks/gpu_throughput.py ${QUICK[*]} --variants ${COMPILED[*]} --loss-classes" \
  "$PY" benchmarks/gpu_throughput.py "${QUICK[@]}" --variants "${COMPILED[@]}" --loss-classes \
  --out "$WORK/compile.md"

echo
report --print
! grep -qv $'\tok\t' "$WORK/steps"  # exit status 1 when a step did not end well
