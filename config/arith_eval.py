# Evaluation settings of the arith study (runs/arith.sh): every test problem, greedy plus 8
# samples at temperature 1 (where imitated systematic mistakes show), pass@1/4/8.
#   python eval.py config/arith_eval.py --init_from=out/arith/seed1337/baseline
data_dir = "data/arith"
split = "test"
n_problems = None
batch_size = 100
max_new_tokens = 48
num_samples = 8
temperature = 1.0
pass_k = [1, 4, 8]
log_interval = 0
