# Stage 2 of the arith study: TD-weighted MTP from the Stage 1 critic (weight_mode='td'); the
# controls are the same run with --weight_mode=uniform|random|shuffled and their own out_dir.
#   python train_verifiable.py config/arith_verifiable.py
out_dir = "out/arith/seed1337/verifiable"
init_from = "out/arith/seed1337/critic"
data_dir = "data/arith"
wandb_run_name = "arith-verifiable"
weight_mode = "td"
beta = 0.9
clip_min = 0.1
clip_max = 5.0
value_coef = 0.5
max_length = 64
n_samples = 8000  # rows per stage run (one epoch = 250 steps at batch 32)
batch_size = 32
n_epochs = 1
learning_rate = 5e-4
min_lr = 5e-5
warmup_iters = 10
eval_interval = 100
log_interval = 25
