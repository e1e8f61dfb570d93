# Stage 0 on Meta's 7B_1T_4 (n_future_tokens = 4) with CodeContests, 4x A100/H100 80GB:
#   torchrun --standalone --nproc_per_node=4 train_baseline.py config/mtp7b_baseline.py
#
# Memory per GPU (DDP keeps a full copy on every rank): 7B_1T_4 has 32 blocks of 202M params
# (dim 4096, SwiGLU 11008): 28 trunk blocks + 4 head blocks, plus 131M embedding and 131M output.
#   frozen trunk + embedding, bf16:       5.79B * 2 B  = 11.6 GB
#   trainable heads + norm + output fp32: 0.94B * 4 B  =  3.8 GB, grads 3.8 GB, AdamW 7.5 GB
#   activations: the frozen trunk keeps none (no grad); one head block at a time is live in the
#   sequential head backward, about 1-2 GB at batch 4 x 2048; logits chunked (ce_chunk_size).
#   total ~ 30 GB of 80 GB.
init_from = "checkpoints/7B_1T_4"  # Meta-format directory: params.json, consolidated.pth, tokenizer.model
data_dir = "data/codecontests"  # python data/codecontests/prepare.py --tokenizer=checkpoints/7B_1T_4/tokenizer.model
out_dir = "out/mtp7b/baseline"
wandb_log = True
wandb_run_name = "mtp7b-baseline"
trainable = "heads"
dtype = "bfloat16"
compile = True
max_length = 2048
batch_size = 4  # per GPU
gradient_accumulation_steps = 8  # 4 GPUs * 4 * 8 = 128 sequences per step
n_epochs = 1
learning_rate = 1e-5
min_lr = 1e-6
warmup_iters = 50
weight_decay = 0.1
grad_clip = 1.0
ce_chunk_size = 4096
eval_interval = 200
log_interval = 10
s3_uri = None  # e.g. "s3://my-bucket/wmtp/mtp7b-baseline"
