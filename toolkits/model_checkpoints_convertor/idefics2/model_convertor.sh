#!/usr/bin/env bash
# Hugging Face Idefics2 -> Megatron checkpoint at TP x PP (writes MG_DIR/release and the tracker).
#   bash model_convertor.sh HF_DIR MG_DIR TP PP [FIRST_STAGE_LAYERS] [--overwrite] [--memory-budget 256MB]
# Back to Hugging Face: bash mg2hf.sh MG_DIR HF_OUT [ITERATION]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
  cat >&2 <<'USAGE'
usage: model_convertor.sh HF_DIR MG_DIR TP PP [FIRST_STAGE_LAYERS] [hf2mcore flags...]
  HF_DIR              Hugging Face Idefics2 folder (config.json + model.safetensors or sharded index)
  MG_DIR              Megatron checkpoint folder to write (release/ + latest_checkpointed_iteration.txt)
  TP, PP              target tensor / pipeline model parallel sizes
  FIRST_STAGE_LAYERS  optional: LLM layers on pipeline stage 0 (uneven split)
  flags               passed to hf2mcore.py, e.g. --overwrite, --memory-budget 1GB
example: bash model_convertor.sh /models/idefics2-8b /ckpts/idefics2-8b-tp2-pp2 2 2
USAGE
  exit 2
}

positional=() flags=()
for arg in "$@"; do
  if [[ "$arg" == --* || ${#flags[@]} -gt 0 ]]; then flags+=("$arg"); else positional+=("$arg"); fi
done
[[ ${#positional[@]} -eq 4 || ${#positional[@]} -eq 5 ]] || usage
for n in "${positional[@]:2}"; do [[ "$n" =~ ^[1-9][0-9]*$ ]] || usage; done

first=()
[[ ${#positional[@]} -eq 5 ]] && first=(--target-decoder-first-pipeline-num-layers "${positional[4]}")
exec "${PYTHON:-python}" "$HERE/hf2mcore.py" \
  --load-path "${positional[0]}" --save-path "${positional[1]}" \
  --target-tensor-model-parallel-size "${positional[2]}" --target-pipeline-model-parallel-size "${positional[3]}" \
  "${first[@]}" "${flags[@]}"
