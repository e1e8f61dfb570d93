#!/usr/bin/env bash
# The whole arith study, from a fresh clone: data -> base model -> correct-only oracle -> stages 0-3,
# the stage-2 controls and positive controls -> eval of each final checkpoint -> one comparison
# table with paired statistics (Markdown + JSON) and figures.
#
#   bash runs/arith.sh                         # one seed (the README's `make study` runs this)
#   SEEDS="1 2 3" bash runs/arith.sh           # repeat the training over seeds (pooled in the paired stats)
#   BASE_PER_SEED=1 SEEDS="1 2 3" bash ...     # also a base model per seed, so the spread includes the base
#   N_TEST=1000 bash runs/arith.sh             # a larger test split (its own data dir: data/arith_test1000)
#   EXTRA="--device=cpu" bash runs/arith.sh    # extra --key=value for every training run
#   JOBS=1 bash runs/arith.sh                  # runs side by side (default 2: one per core, one thread each)
#
# The data is prepared once (its own seed). The base model plays the pretrained model every stage
# starts from: trained once with the first seed (shared), or once per seed with BASE_PER_SEED=1.
# Each seed then repeats everything after it with another training seed (data order, initialisation
# of new heads, random weights, sampling at eval). Every run is evaluated at the same budget: its
# final.pt after one epoch of 8000 rows, on the same test problems (so runs compare problem by
# problem). Everything lands in $OUT (default out/arith); the tables in $OUT/results.md and
# results.json, the figures and report.md beside them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
SEEDS=${SEEDS:-1337}
OUT=${OUT:-out/arith}
EXTRA=${EXTRA:-}
EVAL_ARGS=${EVAL_ARGS:-}
JOBS=${JOBS:-2}
BASE_PER_SEED=${BASE_PER_SEED:-0}
N_TEST=${N_TEST:-}
DATA=${DATA:-data/arith${N_TEST:+_test$N_TEST}}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny models: one thread each is fastest on a shared CPU

# the runs of one seed: name | script | config | arguments (after --init_from etc. below)
RUNS=(
  "reference|train_baseline.py|arith_reference|"
  "baseline|train_baseline.py|arith_baseline|"
  "critic|train_critic.py|arith_critic|"
  "critic_prefix|train_critic.py|arith_critic|--value_target=prefix"
  "verifiable_uniform|train_verifiable.py|arith_verifiable|--weight_mode=uniform"
  "verifiable_random|train_verifiable.py|arith_verifiable|--weight_mode=random"
  "verifiable_shuffled|train_verifiable.py|arith_verifiable|--weight_mode=shuffled"
  "verifiable_td|train_verifiable.py|arith_verifiable|--weight_mode=td"
  "verifiable_td_beta03|train_verifiable.py|arith_verifiable|--weight_mode=td --beta=0.3"
  "verifiable_td_prefix|train_verifiable.py|arith_verifiable|--weight_mode=td --value_target=prefix"
  "oracle_prefix|train_verifiable.py|arith_verifiable|--weight_mode=oracle_prefix"
  "oracle_td|train_verifiable.py|arith_verifiable|--weight_mode=oracle_td"
  "reward|train_verifiable.py|arith_verifiable|--weight_mode=reward"
  "rho1|train_rho1.py|arith_rho1|"
)
N_SEEDS=$(echo $SEEDS | wc -w)
TOTAL=$(( N_SEEDS * ${#RUNS[@]} + (BASE_PER_SEED == 1 ? N_SEEDS : 1) ))
DONE=0
T_START=$(date +%s)

timed() {  # timed NAME DIR cmd...: progress line, run (output to DIR/train.log), record the wall time
  local name=$1 dir=$2; shift 2
  echo "=== [$DONE/$TOTAL, $(( ($(date +%s) - T_START) / 60 )) min so far] $name: $*"
  mkdir -p "$dir"
  echo "$*" > "$dir/cmd.txt"
  local t0; t0=$(date +%s.%N)
  "$@" > "$dir/train.log" 2>&1 || { echo "=== $name failed: tail of $dir/train.log"; tail -20 "$dir/train.log"; return 1; }
  python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$t0" "$(date +%s.%N)" > "$dir/wall_s.txt"
}

evaluate() {  # evaluate RUN_DIR SEED [eval.py args]: its final checkpoint on the test split
  local dir=$1 seed=$2; shift 2
  $PY eval.py config/arith_eval.py --data_dir="$DATA" --init_from="$dir/final.pt" --out="$dir/eval.json" \
    --seed="$seed" "$@" $EVAL_ARGS > "$dir/eval.log" 2>&1 || { echo "=== eval of $dir failed:"; tail -20 "$dir/eval.log"; return 1; }
  echo "=== evaluated $dir: $(grep -m1 'pass@1 greedy' "$dir/eval.log" || true)"
}

run_one() {  # run_one SPEC BASE R SEED: train one run of RUNS, then evaluate its final.pt
  local name script config args init
  IFS="|" read -r name script config args <<< "$1"
  local base=$2 R=$3 seed=$4
  case $name in
    verifiable_*prefix) init="--init_from=$R/critic_prefix" ;;
    verifiable_*|oracle_*|reward) init="--init_from=$R/critic" ;;
    rho1) init="--init_from=$base --ref_init_from=$R/reference" ;;
    *) init="--init_from=$base" ;;
  esac
  # shellcheck disable=SC2086  # $args, $init and the extra settings are lists of arguments
  timed "$name" "$R/$name" $PY "$script" "config/$config.py" $init --out_dir="$R/$name" $args \
    --seed="$seed" --data_dir="$DATA" $EXTRA
  # a critic generates exactly as its base: evaluate only its value head and losses
  case $name in critic*) evaluate "$R/$name" "$seed" --num_samples=0 ;; *) evaluate "$R/$name" "$seed" ;; esac
}

pool() {  # pool BASE R SEED SPEC...: run_one each spec, JOBS at a time; fails if any fails
  local base=$1 R=$2 seed=$3; shift 3
  local failed=0
  for spec in "$@"; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || failed=1; done
    DONE=$((DONE + 1))  # the run's number in the progress line (counted here, before the fork)
    run_one "$spec" "$base" "$R" "$seed" &
  done
  while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n || failed=1; done
  return $failed
}

[ -f "$DATA/meta.json" ] || $PY data/arith/prepare.py --out_dir="$DATA" ${N_TEST:+--n_test_problems=$N_TEST}

for seed in $SEEDS; do
  R=$OUT/seed$seed
  BASE=$OUT/base
  [ "$BASE_PER_SEED" = 1 ] && BASE=$R/base
  if [ ! -f "$BASE/final.pt" ]; then
    DONE=$((DONE + 1))
    timed base "$BASE" $PY train_baseline.py config/arith_base.py --out_dir="$BASE" --seed="$seed" \
      --data_dir="$DATA" $EXTRA
    evaluate "$BASE" "$seed"
  fi
  # the first four runs feed the others (critics -> stage 2, reference -> Rho-1); then the rest
  pool "$BASE" "$R" "$seed" "${RUNS[@]:0:4}"
  pool "$BASE" "$R" "$seed" "${RUNS[@]:4}"
done

$PY runs/summarize.py "$OUT"
echo "=== done in $(( ($(date +%s) - T_START) / 60 )) min: $OUT/report.md"
