# Issue 7's memory claim (n = 4 heads within 10% of n = 1 at the same trunk, batch and sequence)
# on a CPU, at the proportions of config/bench_1b.py scaled down 8x in width: 22 blocks (18 trunk +
# 4 heads), GQA 8/1 heads, SwiGLU 2.75 x dim, all trainable. Per block, activations / (weights +
# AdamW state) and one head's logits / a block's weights + state are those of the 1B run (512 tokens
# x 4-byte fp32 activations here vs 8192 x 2-byte bf16 there, per 1/8 of the width).
#   python bench.py config/bench_cpu_mem.py --threads=2
dim = 256
n_layers = 22
n_heads = 8
n_kv_heads = 1
vocab_size = 8192
multiple_of = 64
n_future_tokens = 4
batch_size = 1
seq_len = 512
warmup = 1
iters = 2
variants = ["base", "n1", "naive", "ce128", "n1+ce128"]
