# Meta's 7B_1T_4 shape (dim 4096, 32 blocks = 28 trunk + 4 heads, 32 heads, vocab 32000), seq 2048,
# bf16, as config/mtp7b_*.py train it: trunk and embeddings frozen (stored in bf16), heads + norm +
# output trained in fp32 with AdamW, chunked CE (4096 tokens). Checks their "~30 GB (+13.5 GB for
# the Rho-1 reference)" estimate: trunk 28 x 202M params in bf16 11.3 GB + embeddings 0.26 GB + the
# 4 head blocks 810M x 16 bytes (fp32 weight, grad, AdamW m and v) 13.0 GB + output 131M x 16 bytes
# 2.1 GB + one head's activations at 4 x 2048 tokens (~1.5 GB; the frozen trunk keeps none) = ~29 GB. Full fine-tuning ('all': ~16 bytes/param = 107 GB) needs FSDP2 and
# is expected to OOM on one 80 GB GPU; bench.py reports that and goes on.
#   python bench.py config/bench_7b_heads.py
dim = 4096
n_layers = 32
n_heads = 32
vocab_size = 32000
multiple_of = 256
n_future_tokens = 4
batch_size = 4
seq_len = 2048
trainable = "heads"
ce_chunk_size = 4096
warmup = 2
iters = 5
variants = ["base", "ce0", "naive", "verifiable", "rho1+cached", "rho1+uncached", "all", "compile"]
