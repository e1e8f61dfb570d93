#!/usr/bin/env bash
# Issue 7: the whole benchmark set on one H100 in under 8 minutes (hard limits below sum to 7m40s).
#   bash dev/bench_h100.sh                           # text + JSON under $OUT if set, else out/bench/
#   PYTHON=.venv/bin/python bash dev/bench_h100.sh   # another interpreter (default: python3)
#   BENCH_EXTRA="--device=cpu --dim=64 --n_heads=8 --n_kv_heads=1 --seq_len=64 --batch_size=1 --multiple_of=32 \
#     --warmup=1 --iters=1" OUT=/tmp/smoke bash dev/bench_h100.sh   # the whole script in miniature (CPU smoke test)
# The last lines printed are dev/bench_summary.py's table of the issue-7 numbers (also summary.md).
# Each group is one bench.py process: its variants run side by side on the same GPU, with ratios
# against the group's first variant. bench.py rewrites its JSON after every variant, so a group cut
# short by its `timeout` still leaves the variants it finished; an OOM is reported per variant.
#   1 bench_1b_impl    ~1.1B LLaMA-MTP n=4, seq 2048, bf16, stage 0, all trainable: vs Hugging Face
#                      LlamaForCausalLM of the same size and batch (and our n=1 22-layer model, the
#                      same FLOPs as the peer); n=1 vs 4 (same trunk, memory);
#                      naive vs sequential head backward; chunked CE; vocab 32001 unpadded vs padded
#                      to 32064 (pad_vocab_multiple=64); torch.compile of the blocks
#   2 bench_1b_stages  stage 2 (verifiable) and stage 3 (rho1, cached and uncached reference) as
#                      ratios to stage 0, same 1B model; 'sync': stage 0 with the train scripts'
#                      per-step host sync (isfinite of the grad norm)
#   3 bench_7b_heads   7B (Meta 7B_1T_4 shape), trunk frozen, heads only, seq 2048: peak memory of
#                      the stages, plain vs chunked CE, naive; full fine-tuning (expected OOM)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DIR=${OUT:-out/bench}
mkdir -p "$DIR"
export PYTHONUNBUFFERED=1
T0=$SECONDS
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$DIR/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$DIR/gpu.txt"

bench() {  # name, hard limit in seconds, bench.py arguments...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s, started at $((SECONDS - T0))s)"
    # shellcheck disable=SC2086  (BENCH_EXTRA is a list of arguments)
    timeout -k 5 "$limit" "$PY" bench.py "$@" ${BENCH_EXTRA:-} --json_out="$DIR/$name.json" 2>&1 \
        | grep -v '^USDT:' | tee "$DIR/$name.txt"
    echo "=== $name: exit ${PIPESTATUS[0]} (124 = cut by the limit), at $((SECONDS - T0))s"
}

bench bench_1b_impl 200 config/bench_1b.py --time_budget_s=130 \
    --variants="['base','hf','n1+L22','n1','naive','ce2048','V32001','V32001+pad64','compile']"
bench bench_1b_stages 100 config/bench_1b.py --time_budget_s=70 \
    --variants="['baseline','sync','verifiable','rho1+cached','rho1+uncached']"
bench bench_7b_heads 150 config/bench_7b_heads.py --time_budget_s=80 \
    --variants="['base','ce0','naive','verifiable','rho1+cached','rho1+uncached','all','compile']"
echo "total $((SECONDS - T0))s; files in $DIR"
"$PY" dev/bench_summary.py "$DIR" | tee "$DIR/summary.md"   # the headline numbers, last in the output
