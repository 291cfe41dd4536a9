#!/usr/bin/env bash
# Score every training save of a Megatron Idefics2 checkpoint folder: a table of scores against iteration.
#   bash toolkits/eval/eval_all_checkpoints.sh MG_DIR DATA [IMAGE_FOLDER]
#     MG_DIR        Megatron checkpoint folder; its iter_XXXXXXX/ folders are evaluated (release/ is not)
#     DATA          LLaVA/ShareGPT .json/.jsonl (then IMAGE_FOLDER is required) or a webdataset shard folder
#   env: EVAL_DIR   output folder (default MG_DIR/eval)
#        EVAL_ARGS  extra generate_and_score.py flags, e.g. "--max-new-tokens 16 --batch-size 16 --limit 200"
#        PYTHON     interpreter (default python)
# For each iteration, in order: mcore2hf.py -> EVAL_DIR/iter_X (HF folder; an identical one is kept as is),
# generate_and_score.py -> EVAL_DIR/iter_X.preds.jsonl + iter_X.summary.json. Then the table is printed
# and written to EVAL_DIR/scores.tsv (columns iteration, exact_match, rouge_l, bleu; NA = not computed).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONVERT="$HERE/../model_checkpoints_convertor/idefics2/mcore2hf.py"
PY="${PYTHON:-python}"

die() { echo "eval_all_checkpoints: error: $*" >&2; exit 1; }

[[ $# -eq 2 || $# -eq 3 ]] || die "expected MG_DIR DATA [IMAGE_FOLDER], got $# arguments (see the header of $0)"
MG_DIR="$1" DATA="$2" IMAGE_FOLDER="${3:-}"
[[ -d "$MG_DIR" ]] || die "MG_DIR $MG_DIR is not a directory"
[[ -e "$DATA" ]] || die "DATA $DATA does not exist"
image_flags=()
if [[ -d "$DATA" ]]; then
  [[ -z "$IMAGE_FOLDER" ]] || die "IMAGE_FOLDER is only for a JSON/JSONL DATA; the shards in $DATA carry their images"
else
  [[ -n "$IMAGE_FOLDER" ]] || die "DATA $DATA is a JSON/JSONL file: pass IMAGE_FOLDER (the root of its image paths)"
  [[ -d "$IMAGE_FOLDER" ]] || die "IMAGE_FOLDER $IMAGE_FOLDER is not a directory"
  image_flags=(--image-folder "$IMAGE_FOLDER")
fi
# Numeric sort on the number: iteration folders may have more than 7 digits.
mapfile -t ITERS < <(find "$MG_DIR" -mindepth 1 -maxdepth 1 -type d -name 'iter_*' -printf '%f\n' \
  | grep -E '^iter_[0-9]{7,}$' | sort -t_ -k2,2n || true)
[[ ${#ITERS[@]} -gt 0 ]] \
  || die "MG_DIR $MG_DIR has no iter_XXXXXXX folders to evaluate (release/ is skipped: it is no training save)"
OUT="${EVAL_DIR:-$MG_DIR/eval}"
read -r -a extra <<< "${EVAL_ARGS:-}"
mkdir -p "$OUT"

for name in "${ITERS[@]}"; do
  iteration=$((10#${name#iter_}))
  echo "eval_all_checkpoints: iteration $iteration ($name)"
  "$PY" "$CONVERT" --load-path "$MG_DIR" --save-path "$OUT/$name" --iteration "$iteration"
  "$PY" "$HERE/generate_and_score.py" --hf-path "$OUT/$name" --data "$DATA" "${image_flags[@]}" \
    --output "$OUT/$name.preds.jsonl" --summary "$OUT/$name.summary.json" --no-progress "${extra[@]}"
done

"$PY" - "$OUT" "${ITERS[@]}" <<'TABLE'
import json, sys
out, names = sys.argv[1], sys.argv[2:]
fmt = lambda v: "NA" if v is None else f"{v:.4f}"
rows = [["iteration", "exact_match", "rouge_l", "bleu"]]
for name in names:
    with open(f"{out}/{name}.summary.json") as f:
        s = json.load(f)
    rows.append([str(int(name[len("iter_"):])), fmt(s["exact_match"]), fmt(s["rouge_l"]), fmt(s["bleu"])])
with open(f"{out}/scores.tsv", "w") as f:
    f.writelines("\t".join(r) + "\n" for r in rows)
widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
for r in rows:
    print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
print(f"eval_all_checkpoints: wrote {out}/scores.tsv")
TABLE
