"""
Stage 0 (baseline): uniform multi-token-prediction cross-entropy.

Every head k is trained on every completion token t+k+1 with weight 1; the loss is the mean
over a head's targets, averaged over the n heads. This is the reference every weighted stage
is compared against.

Single device (CPU, MPS, one GPU):
    python train_baseline.py config/arith_baseline.py
DDP on one machine:
    torchrun --standalone --nproc_per_node=4 train_baseline.py config/mtp7b_baseline.py
Several machines (run on each, NODE_RANK = 0, 1):
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d \
        --rdzv_endpoint=$MASTER_HOST:29500 train_baseline.py config/mtp7b_baseline.py
FSDP2 (full fine-tuning beyond one GPU's memory; also with --nnodes):
    torchrun --standalone --nproc_per_node=8 train_baseline.py config/mtp7b_full_fsdp.py
"""

import math
import os
import time

import torch

import ddp_utils
import train_common as tc
from weighting import head_targets_mask

# -----------------------------------------------------------------------------
# settings (override with a config file and --key=value)
# I/O
out_dir = "out/baseline"
init_from = "scratch"  # 'scratch' | 'resume' | 's3://bucket/prefix' | Meta dir | checkpoint file or run dir
eval_interval = 100  # iterations between validations (and checkpoints)
log_interval = 10  # iterations between log lines
eval_only = False  # evaluate init_from once, log, exit
# data
data_dir = "data/arith"
n_samples: int | None = None  # use at most this many training rows (None: all)
balance_correct = False  # sample correct/incorrect rows at correct_ratio
correct_ratio = 0.5  # fraction of correct rows when balance_correct (1.0: correct only)
max_length = 256  # tokens per row; longer rows are cut or dropped (see overflow)
overflow = "truncate"  # 'truncate' (cut the completion) | 'drop'
# model (init_from='scratch' only; otherwise the checkpoint's)
dim = 128
n_layers = 5  # trunk + heads: layers[:-1] is the trunk, then n_future_tokens head blocks
n_heads = 4
n_kv_heads: int | None = None  # None: = n_heads
multiple_of = 32
ffn_dim_multiplier: float | None = None
norm_eps = 1e-5
rope_theta = 10000.0
n_future_tokens = 4
max_seq_len = 256
# training
trainable = "all"  # 'all' | 'heads' (trunk frozen)
batch_size = 32  # sequences per micro-step per rank
gradient_accumulation_steps = 1  # micro-steps per optimizer step
n_epochs = 1  # used when max_iters is None
max_iters: int | None = None  # optimizer steps (None: n_epochs over the training set)
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 20
lr_decay_iters: int | None = None  # None: max_iters
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0: no clipping (the norm is still computed to catch non-finite gradients)
naive_backward = False  # True: backprop all heads at once (comparison); False: the sequential head backward
ce_chunk_size = 0  # tokens per cross-entropy chunk (0: plain logits); e.g. 4096 for a 32k vocab
max_bad_steps = 10  # consecutive non-finite steps before the run stops
# system
device = "auto"  # 'auto' (cuda > mps > cpu) | 'cuda' | 'cuda:1' | 'mps' | 'cpu'
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # 'float32' | 'bfloat16'
compile = False  # torch.compile the transformer blocks
pad_vocab_multiple = 64 if torch.cuda.is_available() else 1  # embedding/output rows padded for GPU matmuls;
#   padded ids are masked, export.py drops them; a resumed run keeps its checkpoint's layout
fsdp = False  # FSDP2: shard every transformer block over the ranks (torchrun only; README 'FSDP')
seed = 1337
wandb_log = False
wandb_project = "wmtp"
wandb_run_name = "baseline"
s3_uri: str | None = None  # 's3://bucket/prefix': rank 0 uploads checkpoints in the background
s3_keep = 3  # newest checkpoints kept on S3 (plus the best)
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
config = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))}
# -----------------------------------------------------------------------------

try:
    ctx = ddp_utils.setup(device, fsdp)
except ValueError as e:
    tc.fail(e)
tc.check_config(config, ctx)
torch.manual_seed(seed + ctx.rank)
autocast = tc.autocast_context(ctx, dtype)

# data
meta, datasets, loaders = tc.build_data(config, ctx)
train_loader, train_sampler = loaders["train"]
val_loader, _ = loaders["val"]

# model
model, resume = tc.init_model(config, ctx, meta, value_head=False)
n = model.n_future_tokens
tc.set_trainable(model, trainable)
tc.place_model(model, ctx, dtype)  # fsdp: each block sharded over the ranks, the rest replicated
params = [p for p in model.parameters() if p.requires_grad]  # after place_model: fsdp swaps in shards
ddp_utils.broadcast_parameters(model)  # identical start on every rank
tc.maybe_compile(model, compile)
optimizer = tc.configure_optimizer(params, config, ctx)
state = tc.restore_state(resume, optimizer, ctx, model)  # iter, epoch, sampler_pos, best_val_loss
if max_iters is None:
    max_iters = n_epochs * math.ceil(len(train_loader) / gradient_accumulation_steps)
logger, uploader = tc.start_run(config, ctx)
if ctx.master:
    print(f"baseline: {model.num_params() / 1e6:.2f}M params ({sum(p.numel() for p in params) / 1e6:.2f}M trainable), "
          f"{n} heads, {len(datasets['train'])} train rows, {max_iters} iters, {ctx.world_size} rank(s) on {ctx.device}")


if eval_only:
    tc.report(logger, ctx, {"iter": state["iter"], **tc.evaluate(model, val_loader, ctx, autocast)})
    raise SystemExit(tc.finish_run(logger, uploader, ctx))  # 0, or 3: checkpoints missing on S3

# -----------------------------------------------------------------------------
# training loop
batches = tc.epoch_batches(train_loader, train_sampler, state)
model.train()
log_sums = torch.zeros(2, n, device=ctx.device)  # weighted loss sum, target count per head since the last log
log_tokens, t_log = 0, time.time()
while state["iter"] < max_iters:
    it = state["iter"]
    lr = tc.get_lr(it, config, max_iters)
    for group in optimizer.param_groups:
        group["lr"] = lr

    # forward + backward over the micro-steps; gradients stay local until sync_gradients
    for micro_step in range(gradient_accumulation_steps):
        batch = next(batches)
        tokens = batch["input_ids"].to(ctx.device, non_blocking=True)  # (B, L)
        weights = head_targets_mask(batch["loss_mask"].to(ctx.device, non_blocking=True), n)  # (B, L, n) uniform
        with autocast:
            out = model.forward_backward(tokens, weights, loss_scale=1.0 / gradient_accumulation_steps,
                                         naive=naive_backward, ce_chunk_size=ce_chunk_size)
        log_sums += torch.stack([out["head_losses"] * out["head_counts"], out["head_counts"].float()])
        log_tokens += int(batch["lengths"].sum())
    ddp_utils.sync_gradients(params)  # average over ranks, once per optimizer step (fsdp: the replicated rest)
    grad_norm, stepped = tc.optimizer_step(optimizer, params, grad_clip)
    state["iter"] += 1  # counts attempted steps, so a checkpoint's iter matches its data position
    if tc.too_many_bad_steps(stepped, state, config, logger, ctx):
        tc.save_run(model, optimizer, state, config, meta, "baseline", ctx, ("ckpt.pt",), uploader)
        tc.finish_run(logger, uploader, ctx)
        raise SystemExit(1)

    if state["iter"] % log_interval == 0 or state["iter"] == max_iters:
        ddp_utils.all_reduce_sum(log_sums)
        tokens_all = ddp_utils.all_reduce_sum(torch.tensor([float(log_tokens)], device=ctx.device)).item()
        tokens_per_s = tokens_all / (time.time() - t_log)
        head_loss = (log_sums[0] / log_sums[1].clamp(min=1)).tolist()
        tc.report(logger, ctx, {"iter": state["iter"], "epoch": state["epoch"], "train/loss": sum(head_loss) / n,
                                "train/head_loss": head_loss, "lr": lr, "grad_norm": grad_norm.item(),
                                "tokens_per_s": tokens_per_s, "mfu": tc.mfu(model, ctx, dtype, tokens_per_s, max_length),
                                "mem_gb": tc.memory_gb(ctx)})
        log_sums.zero_()
        log_tokens, t_log = 0, time.time()

    if state["iter"] % eval_interval == 0 or state["iter"] == max_iters:
        metrics = {"iter": state["iter"], **tc.evaluate(model, val_loader, ctx, autocast)}
        improved = tc.update_best(metrics, state)
        tc.report(logger, ctx, metrics)
        tc.save_run(model, optimizer, state, config, meta, "baseline", ctx,
                    ("ckpt.pt", "best.pt") if improved else ("ckpt.pt",), uploader)
        t_log = time.time()  # evaluation time is not training throughput

tc.save_run(model, None, state, config, meta, "baseline", ctx, ("final.pt",), uploader)
raise SystemExit(tc.finish_run(logger, uploader, ctx))  # 0, or 3: checkpoints missing on S3
