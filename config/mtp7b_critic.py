# Stage 1 on Meta's 7B_1T_4: the value head alone on the frozen bf16 trunk (no head logits).
#   torchrun --standalone --nproc_per_node=4 train_critic.py config/mtp7b_critic.py
# Memory: frozen model bf16 6.7B * 2 B = 13.5 GB; value head (2 * 4096^2 = 34M fp32 + AdamW)
# ~0.5 GB; no activations kept in the trunk. Batch limited by the trunk forward only.
init_from = "checkpoints/7B_1T_4"
data_dir = "data/codecontests"
out_dir = "out/mtp7b/critic"
wandb_log = True
wandb_run_name = "mtp7b-critic"
trainable = "value_head"
dtype = "bfloat16"
compile = True
balance_correct = True
correct_ratio = 0.5
max_length = 2048
batch_size = 8
gradient_accumulation_steps = 4
n_epochs = 1
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 50
weight_decay = 0.0
eval_interval = 200
log_interval = 10
