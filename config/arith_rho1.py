# Stage 3 of the arith study: Rho-1 selective MTP against the correct-only reference.
#   python train_rho1.py config/arith_rho1.py
out_dir = "out/arith/seed1337/rho1"
init_from = "out/arith/base"
ref_init_from = "out/arith/seed1337/reference"
data_dir = "data/arith"
wandb_run_name = "arith-rho1"
k_percent = 0.6
max_length = 64
n_samples = 8000  # rows per stage run (one epoch = 250 steps at batch 32)
batch_size = 32
n_epochs = 1
learning_rate = 5e-4
min_lr = 5e-5
warmup_iters = 10
eval_interval = 100
log_interval = 25
