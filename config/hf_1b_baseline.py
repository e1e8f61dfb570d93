# Stage 0 from a Hugging Face LLaMA of ~1B parameters on one GPU: TinyLlama-1.1B's layout (22 blocks,
# dim 2048, 32 heads / 4 kv heads, SwiGLU 5632, vocab 32000, context 2048), MTP heads added.
#   huggingface-cli download TinyLlama/TinyLlama_v1.1 --local-dir checkpoints/TinyLlama_v1.1   # once, any way you like
#   python data/arith/prepare.py --tokenizer=checkpoints/TinyLlama_v1.1/tokenizer.model --out_dir=data/arith_tinyllama
#   python train_baseline.py config/hf_1b_baseline.py
#   python export.py --ckpt=out/hf_1b/baseline --out_dir=export/hf_1b --format=hf   # back to transformers
# (any LLaMA directory works the same way: config.json + *.safetensors + tokenizer.model or tokenizer.json)
#
# The model: the source's 22 blocks (21 trunk + head 0 = its last block, so head 0 starts as the
# source model exactly) + 3 new heads, each a copy of that last block: 25 blocks of 44.0M params,
# plus 65.5M embedding and 65.5M output (untied) = 1.23B params.
# Memory, full fine-tuning (trainable='all'; arithmetic, not yet measured on a GPU):
#   weights fp32 4.9 GB + grads 4.9 GB + AdamW 9.8 GB = 19.7 GB
#   activations of the 21 trunk blocks at 4 x 1024 tokens in bf16: roughly 8-10 GB; one head at a
#   time in the sequential head backward; logits chunked (ce_chunk_size)
#   total ~30 GB: one 40 GB or larger GPU. On a 24 GB GPU use trainable='heads' (trunk frozen in bf16).
init_from = "checkpoints/TinyLlama_v1.1"  # a Hugging Face LLaMA directory
data_dir = "data/arith_tinyllama"  # prepared with the model's own tokenizer (see above)
out_dir = "out/hf_1b/baseline"
wandb_run_name = "hf-1b-baseline"
n_future_tokens = 4  # the HF model has one head: heads 1..3 start as copies of its last block
trainable = "all"
dtype = "bfloat16"
compile = True
max_length = 1024
batch_size = 4
gradient_accumulation_steps = 8  # 32 sequences per optimizer step
n_epochs = 1
learning_rate = 2e-5
min_lr = 2e-6
warmup_iters = 50
weight_decay = 0.1
grad_clip = 1.0
ce_chunk_size = 4096
eval_interval = 200
log_interval = 10
