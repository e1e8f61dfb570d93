#!/usr/bin/env bash
# The whole arith study, from a fresh clone: data -> base model -> correct-only oracle -> stages 0-3
# (+ the verifiable controls) -> eval of each -> one comparison table (Markdown + JSON).
#
#   bash runs/arith.sh                    # one seed (the README's `make study` runs this)
#   SEEDS="1 2 3" bash runs/arith.sh      # repeat the training over seeds: mean and spread
#   EXTRA="--device=cpu" bash runs/arith.sh   # extra --key=value for every training run
#
# The data is prepared once (its own seed) and the base model is trained once (with the first
# seed): it plays the pretrained model every stage starts from. SEEDS repeats everything after it
# (the oracle, stages 0-3, the controls, their evaluation) with another training seed (data order,
# initialisation of new heads, random weights, sampling at eval), so the spread in the table is
# the spread of the stage comparison. Everything lands in $OUT (default out/arith); the table in
# $OUT/results.md and $OUT/results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
SEEDS=${SEEDS:-1337}
OUT=${OUT:-out/arith}
EXTRA=${EXTRA:-}
EVAL_ARGS=${EVAL_ARGS:-}
mkdir -p "$OUT"

timed() {  # timed NAME DIR cmd...: run, and record the wall time in DIR/wall_s.txt
  local name=$1 dir=$2; shift 2
  echo "=== $name: $*"
  local t0; t0=$(date +%s.%N)
  "$@"
  mkdir -p "$dir"
  python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$t0" "$(date +%s.%N)" > "$dir/wall_s.txt"
}

[ -f data/arith/meta.json ] || $PY data/arith/prepare.py

FIRST_SEED=${SEEDS%% *}
if [ ! -f "$OUT/base/final.pt" ]; then
  timed base "$OUT/base" $PY train_baseline.py config/arith_base.py --out_dir="$OUT/base" --seed=$FIRST_SEED $EXTRA
fi
echo "=== eval base"
$PY eval.py config/arith_eval.py --init_from="$OUT/base" --out="$OUT/base/eval.json" --seed=$FIRST_SEED $EVAL_ARGS

for seed in $SEEDS; do
  R=$OUT/seed$seed
  S="--seed=$seed $EXTRA"
  timed reference "$R/reference" $PY train_baseline.py config/arith_reference.py --init_from="$OUT/base" --out_dir="$R/reference" $S
  timed baseline "$R/baseline" $PY train_baseline.py config/arith_baseline.py --init_from="$OUT/base" --out_dir="$R/baseline" $S
  timed critic "$R/critic" $PY train_critic.py config/arith_critic.py --init_from="$OUT/base" --out_dir="$R/critic" $S
  for mode in td uniform random shuffled; do
    timed "verifiable_$mode" "$R/verifiable_$mode" $PY train_verifiable.py config/arith_verifiable.py \
      --init_from="$R/critic" --out_dir="$R/verifiable_$mode" --weight_mode=$mode $S
  done
  timed rho1 "$R/rho1" $PY train_rho1.py config/arith_rho1.py --init_from="$OUT/base" \
    --ref_init_from="$R/reference" --out_dir="$R/rho1" $S
  for run in reference baseline critic verifiable_td verifiable_uniform verifiable_random verifiable_shuffled rho1; do
    echo "=== eval $run"
    # the critic generates exactly as the base model: evaluate only its value head and losses
    [ $run = critic ] && N="--num_samples=0" || N=""
    $PY eval.py config/arith_eval.py --init_from="$R/$run" --out="$R/$run/eval.json" --seed=$seed $N $EVAL_ARGS
  done
done

$PY runs/summarize.py "$OUT"
