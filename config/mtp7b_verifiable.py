# Stage 2 on Meta's 7B_1T_4: TD-weighted MTP heads + value head from the Stage 1 critic.
#   torchrun --standalone --nproc_per_node=4 train_verifiable.py config/mtp7b_verifiable.py
# Memory as config/mtp7b_baseline.py plus the value head (~0.5 GB with AdamW): ~31 GB of 80 GB.
init_from = "out/mtp7b/critic"
data_dir = "data/codecontests"
out_dir = "out/mtp7b/verifiable"
wandb_log = True
wandb_run_name = "mtp7b-verifiable"
trainable = "heads+value_head"
dtype = "bfloat16"
compile = True
weight_mode = "td"
weight_scope = "micro_batch"  # TD weights normalised per micro-batch: the step-wide population would cost a
#   second forward of the frozen 7B trunk per micro-batch (most of a heads-only step)
beta = 0.9
clip_min = 0.1
clip_max = 5.0
value_coef = 0.5
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
