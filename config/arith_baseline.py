# Stage 0 of the arith study: the base model fine-tuned with uniform MTP CE on all solutions,
# the same data and budget as the weighted stages.
#   python train_baseline.py config/arith_baseline.py
out_dir = "out/arith/seed1337/baseline"
init_from = "out/arith/base"
data_dir = "data/arith"
wandb_run_name = "arith-baseline"
max_length = 64
n_samples = 8000  # rows per stage run (one epoch = 250 steps at batch 32)
batch_size = 32
n_epochs = 1
learning_rate = 5e-4
min_lr = 5e-5
warmup_iters = 10
eval_interval = 100
log_interval = 25
