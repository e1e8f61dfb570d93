# Stage 1 of the arith study: a value head on the frozen base model's trunk.
#   python train_critic.py config/arith_critic.py
out_dir = "out/arith/seed1337/critic"
init_from = "out/arith/base"
data_dir = "data/arith"
wandb_run_name = "arith-critic"
trainable = "value_head"
balance_correct = True
correct_ratio = 0.5
max_length = 64
n_samples = 8000  # rows per stage run (one epoch = 250 steps at batch 32)
batch_size = 32
n_epochs = 1
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 10
eval_interval = 100
log_interval = 25
