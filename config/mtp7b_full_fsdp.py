# Stage 0 with FULL fine-tuning of Meta's 7B_1T_4 (embeddings, trunk, heads) under FSDP2, 4-8 80 GB GPUs:
#   torchrun --standalone --nproc_per_node=8 train_baseline.py config/mtp7b_full_fsdp.py
#   torchrun --standalone --nproc_per_node=4 train_baseline.py config/mtp7b_full_fsdp.py --gradient_accumulation_steps=16
# Two nodes, the same line on each (out_dir on storage both nodes mount at the same path: every rank writes its
# shard of the optimizer state there; without it the run stops at start):
#   torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST0:29500 --rdzv_id=run1 \
#       train_baseline.py config/mtp7b_full_fsdp.py --gradient_accumulation_steps=4 --out_dir=/shared/out/7b_full
# The other stages take the same two lines (fsdp = True, trainable = "all") in their own 7B configs.
#
# Why FSDP: DDP keeps weights + grads + AdamW on every GPU, 16 B/param * 6.74B = 108 GB > 80 GB.
# Memory per GPU with N GPUs. 7B_1T_4: 32 blocks of 202.4M params (28 trunk + 4 heads) = 6.48B,
# sharded; tok_embeddings + output 2 * 32000 * 4096 = 262M (+ norm), replicated on every GPU.
#   sharded blocks: fp32 weights 4 + fp32 grads 4 + AdamW m, v 8 = 16 B/param
#                   * 6.48B / N                                          = 25.9 GB (N=4), 13.0 GB (N=8)
#   replicated embeddings + output, the same 16 B/param * 262M           =  4.2 GB
#   transient: 1-2 gathered bf16 blocks (0.4 GB each), one block's unsharded bf16 grad and fp32
#     reduce-scatter buffer (0.4 + 0.8 GB)                               ~  2   GB
#   activations: 227 KB per token per block (saved tensors of one block under bf16 autocast,
#     measured on the CPU: 55.5 * dim bytes; no activation checkpointing). The 28 trunk blocks keep
#     theirs until the trunk backward: 6.4 MB/token = 13.0 GB per 2048-token sequence; one head
#     block at a time on top (+0.5 GB); logits chunked (ce_chunk_size)  = 13.0 GB * batch_size
#   N=4, batch_size 2: 25.9 + 4.2 + 2 + 26.1 = ~58 GB of 80 (batch_size 3: ~71 GB, too tight)
#   N=8, batch_size 2: 13.0 + 4.2 + 2 + 26.1 = ~45 GB of 80 (batch_size 3: ~58 GB fits)
# An estimate, not yet measured on GPUs. Host RAM: every rank loads the whole checkpoint on the
# CPU in fp32 before sharding it (27 GB per rank, ~220 GB for 8 ranks on one node).
# Disk per evaluation: ckpt.pt with the whole fp32 model (27 GB, also best.pt when it improves) plus
# ckpt_dcp/<iter>/ with sharded weights and AdamW state (81 GB); only the newest DCP folder is kept.
init_from = "checkpoints/7B_1T_4"  # Meta-format directory: params.json, consolidated.pth, tokenizer.model
data_dir = "data/codecontests"  # python data/codecontests/prepare.py --tokenizer=checkpoints/7B_1T_4/tokenizer.model
out_dir = "out/mtp7b/full_fsdp"
wandb_log = True
wandb_run_name = "mtp7b-full-fsdp"
fsdp = True
trainable = "all"
dtype = "bfloat16"  # FSDP gathers the weights in bf16, reduces the gradients in fp32
compile = True  # each block compiled after sharding (ran on CPU with FSDP; set False if it fails on your stack)
max_length = 2048
batch_size = 2  # per GPU
gradient_accumulation_steps = 8  # 8 GPUs * 2 * 8 = 128 sequences per step (4 GPUs: 16; 16 GPUs: 4)
n_epochs = 1
learning_rate = 1e-5
min_lr = 1e-6
warmup_iters = 50
weight_decay = 0.1
grad_clip = 1.0
ce_chunk_size = 4096
eval_interval = 200
log_interval = 10
s3_uri = None  # uploads ckpt.pt/best.pt/final.pt (whole weights); the DCP folder (AdamW state) stays in out_dir
