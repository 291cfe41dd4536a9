#!/usr/bin/env bash
# Megatron Idefics2 checkpoint (any TP x PP) -> Hugging Face folder (config, safetensors, tokenizer/processor).
#   bash mg2hf.sh MG_DIR HF_OUT [ITERATION] [--overwrite] [--max-shard-size 5GB]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
  cat >&2 <<'USAGE'
usage: mg2hf.sh MG_DIR HF_OUT [ITERATION] [mcore2hf flags...]
  MG_DIR     Megatron checkpoint folder (with latest_checkpointed_iteration.txt)
  HF_OUT     Hugging Face folder to write
  ITERATION  optional: iteration number or 'release' (default: the tracker's)
  flags      passed to mcore2hf.py, e.g. --overwrite, --max-shard-size 2GB
example: bash mg2hf.sh /ckpts/idefics2-8b-tp2-pp2 /models/idefics2-8b-sft 2000
USAGE
  exit 2
}

positional=() flags=()
for arg in "$@"; do
  if [[ "$arg" == --* || ${#flags[@]} -gt 0 ]]; then flags+=("$arg"); else positional+=("$arg"); fi
done
[[ ${#positional[@]} -eq 2 || ${#positional[@]} -eq 3 ]] || usage
iteration=()
if [[ ${#positional[@]} -eq 3 ]]; then
  [[ "${positional[2]}" =~ ^([0-9]+|release)$ ]] || usage
  iteration=(--iteration "${positional[2]}")
fi
exec "${PYTHON:-python}" "$HERE/mcore2hf.py" --load-path "${positional[0]}" --save-path "${positional[1]}" \
  "${iteration[@]}" "${flags[@]}"
