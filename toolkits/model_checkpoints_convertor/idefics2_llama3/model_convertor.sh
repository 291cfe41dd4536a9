#!/usr/bin/env bash
# Compose Idefics2 from a Llama-3 LLM + SigLIP, then (optionally) convert it to Megatron at TP x PP.
#   bash model_convertor.sh LLAMA_DIR SIGLIP_DIR HF_OUT [MG_DIR TP PP [FIRST_STAGE_LAYERS]] [compose flags...]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
  cat >&2 <<'USAGE'
usage: model_convertor.sh LLAMA_DIR SIGLIP_DIR HF_OUT [MG_DIR TP PP [FIRST_STAGE_LAYERS]] [compose flags...]
  LLAMA_DIR           Hugging Face Llama-3 style causal LM folder, with its tokenizer
  SIGLIP_DIR          Hugging Face SiglipVisionModel (or SiglipModel) folder
  HF_OUT              composed Hugging Face Idefics2 folder to write
  MG_DIR TP PP        optional: also convert HF_OUT to a Megatron checkpoint at TP x PP
  FIRST_STAGE_LAYERS  optional: LLM layers on pipeline stage 0 (uneven split)
  flags               passed to compose.py, e.g. --perceiver-latents 64 --seed 42 --overwrite
example: bash model_convertor.sh /models/Meta-Llama-3-8B /models/siglip-so400m-patch14-384 \
           /models/idefics2-llama3-init /ckpts/idefics2-llama3-tp2-pp2 2 2
USAGE
  exit 2
}

positional=() flags=()
for arg in "$@"; do
  if [[ "$arg" == --* || ${#flags[@]} -gt 0 ]]; then flags+=("$arg"); else positional+=("$arg"); fi
done
count=${#positional[@]}
[[ $count -eq 3 || $count -eq 6 || $count -eq 7 ]] || usage
for n in "${positional[@]:4}"; do [[ "$n" =~ ^[1-9][0-9]*$ ]] || usage; done

"${PYTHON:-python}" "$HERE/compose.py" --llm-path "${positional[0]}" --vision-path "${positional[1]}" \
  --save-path "${positional[2]}" "${flags[@]}"
if [[ $count -ge 6 ]]; then
  exec bash "$HERE/../idefics2/model_convertor.sh" "${positional[2]}" "${positional[@]:3}"
fi
