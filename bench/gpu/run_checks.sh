#!/usr/bin/env bash
# The model's GPU checks in one command, for a machine with one CUDA GPU and no package index:
# parity with transformers in fp32 and bf16 (bench/gpu/parity.py, and the user-facing
# check_hf_parity.py on a tiny checkpoint), the ~1B bf16 training-step benchmark against
# transformers (bench/bench_train_step.py --size 1b), and both again with the newest megatron-core.
#
# 1. Where pip reaches a package index (from the repo root):
#        bash bench/gpu/run_checks.sh --fetch       # wheels for Python 3.12 -> .whl/ (git-ignored)
# 2. On the GPU machine (from the repo root; .whl/ copied along), one call per megatron-core
#    version so each fits a 10-minute call (the Inductor cache in /tmp is kept between calls):
#        bash bench/gpu/run_checks.sh OUTDIR 0.16.1  # log.txt and JSON results in OUTDIR
#        bash bench/gpu/run_checks.sh OUTDIR 0.19.2
#        bash bench/gpu/run_checks.sh OUTDIR         # every version in one call
#    Prerequisites (nvidia-smi, torch with CUDA, transformers, safetensors, the wheels) are checked
#    first; a missing one is one line and exit 2, before any minute is spent.
#
# Each megatron-core version is installed into its own folder and put first on PYTHONPATH; the
# machine's own torch, transformers and safetensors are used. A failing step is logged and the
# next one runs; the exit status is the number of failed steps.
set -u -o pipefail
MCORE_VERSIONS=(0.16.1 0.19.2)  # the verified one, then the newest released
FULL_CHECKS=${MCORE_VERSIONS[0]}  # the one that also runs check_hf_parity and the full benchmark
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
PY=${PYTHON:-python3}
# The benchmark's flags; GPU_CHECKS_BENCH replaces both (e.g. "--seqs 256 --rounds 1" to try the script on a CPU).
BENCH=${GPU_CHECKS_BENCH:---size 1b --dtype bf16 --seqs 2048 4096 --packed 4096 --rounds 5}
BENCH_NEWEST=${GPU_CHECKS_BENCH:---size 1b --dtype bf16 --seqs 4096 --rounds 3}

if [ "${1:-}" = "--fetch" ]; then
  fetch() { $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d "$@"; }
  for v in "${MCORE_VERSIONS[@]}"; do fetch ".whl/mcore-$v" "megatron-core==$v" || exit 1; done
  fetch .whl/common webdataset braceexpand || exit 1
  ls -R .whl
  exit 0
fi

OUT=${1:?usage: bash bench/gpu/run_checks.sh OUTDIR [MCORE_VERSION] | --fetch}
if [ -n "${2:-}" ]; then
  case " ${MCORE_VERSIONS[*]} " in *" $2 "*) MCORE_VERSIONS=("$2") ;;
    *) echo "run_checks: megatron-core $2 is not one of ${MCORE_VERSIONS[*]}" >&2; exit 2 ;; esac
fi
need() { echo "run_checks: $1" >&2; exit 2; }
command -v nvidia-smi >/dev/null || need "nvidia-smi not found: this is not a GPU machine"
$PY -c "import torch, transformers, safetensors; assert torch.cuda.is_available()" 2>/dev/null \
  || need "$PY lacks torch with CUDA, transformers or safetensors"
ls .whl/common/*.whl >/dev/null 2>&1 || need ".whl/common holds no wheels: run 'bash bench/gpu/run_checks.sh --fetch' first"
for v in "${MCORE_VERSIONS[@]}"; do
  ls .whl/mcore-"$v"/*.whl >/dev/null 2>&1 || need ".whl/mcore-$v holds no wheel: run --fetch first"
done
mkdir -p "$OUT"
LOG=$OUT/log.txt
# torch.compile's Inductor cache outlives the steps and the calls on the same machine.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}
failed=0
step() {  # step NAME COMMAND...: run, log, count a failure, go on
  local name=$1; shift
  echo "=== $name: $*" | tee -a "$LOG"
  local start=$SECONDS
  "$@" 2>&1 | grep -v "Unknown MLP type\|UserWarning\|warnings.warn" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
  [ "$rc" = 0 ] || failed=$((failed + 1))
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } 2>&1 | tee -a "$LOG"
for v in "${MCORE_VERSIONS[@]}"; do
  site=/tmp/site-mcore-$v
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/common/*.whl .whl/mcore-"$v"/*.whl \
    || { echo "=== cannot install megatron-core $v from .whl (run --fetch first)" | tee -a "$LOG"; failed=$((failed + 1)); continue; }
  export PYTHONPATH=$site:$PWD
  step "parity mcore $v" $PY -m bench.gpu.parity --out "$OUT/gpu_parity_mcore-$v.json"
  if [ "$v" = "$FULL_CHECKS" ]; then
    hf=/tmp/gpu_checks_tiny_hf
    step "tiny checkpoint" $PY toolkits/model_checkpoints_convertor/idefics2/make_tiny_checkpoint.py --save-path $hf
    step "check_hf_parity fp32" $PY toolkits/model_checkpoints_convertor/idefics2/check_hf_parity.py --hf-path $hf
    step "check_hf_parity bf16" $PY toolkits/model_checkpoints_convertor/idefics2/check_hf_parity.py --hf-path $hf --bf16
    step "train step" $PY -m bench.bench_train_step $BENCH --out "$OUT/train_step_gpu.json"
  else
    step "train step mcore $v" $PY -m bench.bench_train_step $BENCH_NEWEST --out "$OUT/train_step_gpu_mcore-$v.json"
  fi
done
echo "=== $failed failed step(s)" | tee -a "$LOG"
exit $failed
