# The correct-only oracle: the base model fine-tuned on correct solutions only (uniform MTP CE).
# It is the upper bound of the study and the frozen reference of Stage 3 (Rho-1).
#   python train_baseline.py config/arith_reference.py
out_dir = "out/arith/seed1337/reference"
init_from = "out/arith/base"
data_dir = "data/arith"
wandb_run_name = "arith-reference"
balance_correct = True
correct_ratio = 1.0  # correct rows only
max_length = 64
n_samples = 8000  # rows per stage run (one epoch = 250 steps at batch 32)
batch_size = 32
n_epochs = 1
learning_rate = 5e-4
min_lr = 5e-5
warmup_iters = 10
eval_interval = 100
log_interval = 25
