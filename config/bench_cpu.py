# A small LLaMA-MTP for a laptop/CI CPU (the CPU table in dev/LOG.md): 6 blocks (2 trunk + 4 heads),
# dim 256, vocab 8192, 4 x 256 tokens, float32. One thread is the steadier number on a shared machine:
#   python bench.py config/bench_cpu.py --threads=1 --compile_on_cpu=True
dim = 256
n_layers = 6
n_heads = 4
vocab_size = 8192
multiple_of = 64
n_future_tokens = 4
batch_size = 4
seq_len = 256
warmup = 2
iters = 5
variants = ["base", "naive", "ce256", "n1", "n1+L6", "hf", "compile", "heads", "verifiable", "rho1+cached",
            "rho1+uncached"]
