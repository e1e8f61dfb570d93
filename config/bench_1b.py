# ~1.1B LLaMA-MTP with 4 heads: TinyLlama-1.1B's shape (dim 2048, 22 blocks = 18 trunk + 4 heads,
# GQA 32/4 heads, SwiGLU 5632, vocab 32000), seq 2048, bf16 autocast, every weight trainable.
# One H100: ~17.6 GB of fp32 weights + AdamW state, plus activations at 4 x 2048 tokens.
#   python bench.py config/bench_1b.py --variants="['base','hf','n1','naive']"
dim = 2048
n_layers = 22
n_heads = 32
n_kv_heads = 4
vocab_size = 32000
multiple_of = 256
n_future_tokens = 4
batch_size = 4
seq_len = 2048
trainable = "all"
warmup = 3
iters = 10
variants = ["base", "hf", "n1", "naive", "ce2048", "compile"]
