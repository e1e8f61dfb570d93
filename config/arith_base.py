# The base model of the arith study: a tiny LLaMA-MTP trained from scratch on every solution,
# correct or not, so it imitates the mistakes in the data (the "pretrained model" of the study).
#   python train_baseline.py config/arith_base.py
out_dir = "out/arith/base"
init_from = "scratch"
data_dir = "data/arith"
wandb_run_name = "arith-base"
dim = 128
n_layers = 6  # layers[:-1] = 2 trunk blocks, then 4 head blocks (n_layers - n_future_tokens + 1 = 3 in layers)
n_heads = 4
n_future_tokens = 4
multiple_of = 32
max_seq_len = 64
max_length = 64
batch_size = 32
n_epochs = 2
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 50
eval_interval = 250
log_interval = 50
