#!/usr/bin/env bash
# GPU checks and benchmarks in one call, for a bare CUDA machine:
#     bash benchmarks/gpu_check.sh OUTDIR [path/to/real/train.csv]
# 1. the unit tests with CUDA visible; the CUDA-graph step against the eager one (graph_check.py);
#    a small end-to-end run on cuda (sample data);
# 2. the speed benchmark on cuda (training with and without CUDA graphs, inference, prepare) at
#    the defaults and at batch 1024;
# 3. full-size `submit` on synthetic data at the defaults and without CUDA graphs (folds at once);
# 4. with a real train.csv: 5-fold accuracy on cuda, folds in parallel, with and without graphs;
# 5. with FULL_TRAIN= (and FULL_TEST=) the competition-sized files: the default and the candidates
#    for a GPU recipe, their submissions kept under OUTDIR/full/work/submissions.
# Uses .venv when it has a CUDA build of torch, else the machine's python3. Where that python3 lacks
# PyTorch or another dependency, WHEELS=folder installs them from wheels brought along (offline):
#     WHEELS=wheels bash benchmarks/gpu_check.sh OUTDIR
# Each step has its own time limit (together under 10 minutes); a whole run takes about 6 minutes.
# FULL_TRAIN adds up to 10 more: give it a call of its own (the other steps are quick to repeat).
set -uo pipefail
out=${1:?usage: gpu_check.sh OUTDIR [train.csv]}
real_train=${2:-}
cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
# PY= picks the interpreter; DEVICE=cpu makes a dry run of the script itself on a machine without a GPU.
device=${DEVICE:-cuda}
py=${PY:-python3}
if [ -z "${PY:-}" ] && [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  py=.venv/bin/python
fi
if ! $py -c "import torch, pandas, sklearn, tqdm, pytest" 2>/dev/null; then
  if [ -n "${WHEELS:-}" ] && [ -d "$WHEELS" ]; then
    echo "installing the dependencies from $WHEELS"
    $py -m pip install --quiet --no-index --find-links "$WHEELS" torch numpy pandas scikit-learn \
      tqdm matplotlib pytest || echo "gpu_check: installing from $WHEELS failed"
  else
    echo "gpu_check: $py lacks PyTorch or another dependency; pass WHEELS=folder of wheels"
  fi
fi
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
summary=$out/summary.txt
: > "$summary"
step() { echo; echo "== $1 ($(date +%T))" | tee -a "$summary"; }

step "environment"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nproc; } 2>&1 | tee -a "$summary"

step "unit tests with CUDA visible"
timeout 60 $py -m pytest -q -x -p no:cacheprovider tests/test_engine.py 2>&1 \
  | tail -5 | tee -a "$summary"

step "CUDA graph step against the eager step (rnn, gru, lstm, with and without AMP; every readout, view, step width; EMA)"
timeout 90 $py benchmarks/graph_check.py --device $device --out "$out/graph" 2>&1 | tee -a "$summary"

step "small end-to-end run on cuda (sample, 2 folds, 3 epochs)"
timeout 60 $py -m pipeline --root "$scratch/small" submit --source sample --device $device --folds 2 \
  --epochs 3 2>&1 | grep -E "train:|CUDA graph|OOF accuracy|Error|error" | tee -a "$summary"

step "speed benchmark on cuda: defaults (with prepare), then batch 1024"
timeout 90 $py benchmarks/speed.py --device $device --rows 33600 --repeats 3 --out "$out/speed" 2>&1 \
  | tee -a "$summary"
timeout 50 $py benchmarks/speed.py --device $device --rows 33600 --repeats 3 --batch 1024 --skip-prepare \
  2>&1 | grep -E "samples/s|x$" | tee -a "$summary"

step "full-size submit on cuda (42,000 + 28,000 synthetic rows), defaults, then without CUDA graphs"
timeout 160 $py benchmarks/speed.py --device $device --rows 2048 --repeats 1 --skip-prepare \
  --e2e= --e2e=--no-cuda-graph --out "$out/e2e" 2>&1 | grep -E "submit|training|FAILED" -A1 \
  | tee -a "$summary"

if [ -n "$real_train" ] && [ -f "$real_train" ]; then
  step "accuracy on real digits, cuda, 5 folds at once"
  # Device and CUDA graphs are not part of a run's id: each variant gets a project of its own.
  for variant in "default:device=$device" "nograph:device=$device+cuda_graph=0"; do
    timeout 40 $py benchmarks/accuracy.py --train "$real_train" --variants "$variant" 2>&1 | tail -2 \
      | tee -a "$summary"
  done
fi
if [ -n "${FULL_TRAIN:-}" ] && [ -f "$FULL_TRAIN" ]; then
  # FULL_TRAIN / FULL_TEST: the competition-sized train.csv and test.csv (42,000 + 28,000 rows).
  # The candidates for a GPU recipe: wider, deeper and longer vanilla RNNs, which a CPU cannot afford
  # at this size. One project keeps them all, so they blend (`make blend` there) on the same folds.
  step "full-size accuracy on cuda, 5 folds at once, real test kept: the default and GPU candidates"
  test_arg=${FULL_TEST:+--test "$FULL_TEST"}
  for variant in "default:device=$device" "best:device=$device+preset=best" \
      "both-wide:device=$device+view=both+hidden=256+epochs=60" \
      "deep:device=$device+layers=2+hidden=256+epochs=60"; do
    timeout 150 $py benchmarks/accuracy.py --train "$FULL_TRAIN" $test_arg --variants "$variant" \
      --project "$out/full" 2>&1 | tail -2 | tee -a "$summary"
  done
fi
step "done"
