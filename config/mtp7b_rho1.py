# Stage 3 on Meta's 7B_1T_4: Rho-1 selective MTP against a frozen reference.
#   torchrun --standalone --nproc_per_node=4 train_rho1.py config/mtp7b_rho1.py
# Memory: config/mtp7b_baseline.py's ~30 GB plus the frozen reference in bf16 (13.5 GB) = ~44 GB
# of 80 GB. The reference's per-token losses are cached on the CPU (4 heads * 4 B per token:
# 16 B/token, e.g. 1.6 GB for 100M tokens), so from the second epoch no reference forward runs.
init_from = "checkpoints/7B_1T_4"
ref_init_from = "out/mtp7b/reference"  # e.g. train_baseline.py on correct solutions only
data_dir = "data/codecontests"
out_dir = "out/mtp7b/rho1"
wandb_log = True
wandb_run_name = "mtp7b-rho1"
trainable = "heads"
dtype = "bfloat16"
compile = True
k_percent = 0.6
selection_scope = "micro_batch"  # top-k per micro-batch: the step-wide selection would cost a second
#   no-grad forward of the 7B policy per micro-batch
max_length = 2048
batch_size = 4
gradient_accumulation_steps = 8
n_epochs = 1
learning_rate = 1e-5
min_lr = 1e-6
warmup_iters = 50
ce_chunk_size = 4096
eval_interval = 200
log_interval = 10
