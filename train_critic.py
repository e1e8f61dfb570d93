"""
Stage 1 (critic): train the value head alone, so Stage 2 starts from a critic that already
tells good solutions from bad ones.

Only the trunk runs (no head logits are computed) and it is frozen; the value head V[b,t]
regresses the sample's reward R[b] (1 correct, 0 not) at the last prompt position and every
completion position: loss = mean (V[b,t] - R[b])^2. Validation also reports how well V at the
last token separates correct from incorrect samples (accuracy at 0.5 and AUC).

Single device:
    python train_critic.py config/arith_critic.py
DDP:
    torchrun --standalone --nproc_per_node=4 train_critic.py config/mtp7b_critic.py
"""

import math
import os
import time

import torch

import ddp_utils
import train_common as tc
from weighting import value_loss, value_mask

# -----------------------------------------------------------------------------
# settings (override with a config file and --key=value)
# I/O
out_dir = "out/critic"
init_from = "out/base"  # the policy whose trunk the critic reads: run dir, checkpoint, Meta dir, 'resume', s3://
eval_interval = 100  # iterations between validations (and checkpoints)
log_interval = 10
eval_only = False  # evaluate init_from once, log, exit
# data
data_dir = "data/arith"
n_samples: int | None = None  # use at most this many training rows (None: all)
balance_correct = True  # a critic needs both labels: sample them at correct_ratio
correct_ratio = 0.5
max_length = 256
overflow = "truncate"  # 'truncate' | 'drop'
# training
trainable = "value_head"  # 'value_head' (trunk frozen, as the stage is defined) | 'all'
batch_size = 32
gradient_accumulation_steps = 1
n_epochs = 1
max_iters: int | None = None  # None: n_epochs over the training set
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 20
lr_decay_iters: int | None = None
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
max_bad_steps = 10
# system
device = "auto"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"
compile = False
pad_vocab_multiple = 64 if torch.cuda.is_available() else 1  # vocab rows padded for GPU matmuls (padded ids masked)
fsdp = False  # FSDP2 sharding of the blocks (see train_baseline.py)
seed = 1337
wandb_log = False
wandb_project = "wmtp"
wandb_run_name = "critic"
s3_uri: str | None = None
s3_keep = 3
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

meta, datasets, loaders = tc.build_data(config, ctx)
train_loader, train_sampler = loaders["train"]
val_loader, _ = loaders["val"]

model, resume = tc.init_model(config, ctx, meta, value_head=True)  # a fresh value head unless init_from has one
tc.set_trainable(model, trainable)
tc.place_model(model, ctx, dtype)  # fsdp: each block sharded over the ranks, the rest replicated
params = [p for p in model.parameters() if p.requires_grad]  # after place_model: fsdp swaps in shards
ddp_utils.broadcast_parameters(model)
tc.maybe_compile(model, compile)
optimizer = tc.configure_optimizer(params, config, ctx)
state = tc.restore_state(resume, optimizer, ctx, model)
if max_iters is None:
    max_iters = n_epochs * math.ceil(len(train_loader) / gradient_accumulation_steps)
logger, uploader = tc.start_run(config, ctx)
if ctx.master:
    print(f"critic: {sum(p.numel() for p in params) / 1e6:.3f}M trainable params, {len(datasets['train'])} train rows, "
          f"{max_iters} iters, {ctx.world_size} rank(s) on {ctx.device}")

if eval_only:
    tc.report(logger, ctx, {"iter": state["iter"], **tc.evaluate(model, val_loader, ctx, autocast, heads=False, value=True)})
    raise SystemExit(tc.finish_run(logger, uploader, ctx))  # 0, or 3: checkpoints missing on S3

# -----------------------------------------------------------------------------
# training loop
batches = tc.epoch_batches(train_loader, train_sampler, state)
model.train()
log_sums = torch.zeros(2, device=ctx.device)  # squared-error sum, value positions since the last log
log_tokens, t_log = 0, time.time()
while state["iter"] < max_iters:
    lr = tc.get_lr(state["iter"], config, max_iters)
    for group in optimizer.param_groups:
        group["lr"] = lr

    for micro_step in range(gradient_accumulation_steps):
        batch = next(batches)
        tokens = batch["input_ids"].to(ctx.device, non_blocking=True)  # (B, L)
        loss_mask = batch["loss_mask"].to(ctx.device, non_blocking=True)  # (B, L)
        reward = batch["reward"].to(ctx.device, non_blocking=True)  # (B,)
        vmask = value_mask(loss_mask)  # (B, L) last prompt position + completion
        with autocast:
            h_trunk = model.trunk_forward(tokens)  # (B, L, dim); no graph when the trunk is frozen
        values = model.value(h_trunk)  # (B, L) fp32
        loss = value_loss(values, reward, vmask)
        (loss / gradient_accumulation_steps).backward()
        log_sums += torch.stack([loss.detach() * vmask.sum(), vmask.sum()])
        log_tokens += int(batch["lengths"].sum())
    ddp_utils.sync_gradients(params)
    grad_norm, stepped = tc.optimizer_step(optimizer, params, grad_clip)
    state["iter"] += 1  # counts attempted steps, so a checkpoint's iter matches its data position
    if tc.too_many_bad_steps(stepped, state, config, logger, ctx):
        tc.save_run(model, optimizer, state, config, meta, "critic", ctx, ("ckpt.pt",), uploader)
        tc.finish_run(logger, uploader, ctx)
        raise SystemExit(1)

    if state["iter"] % log_interval == 0 or state["iter"] == max_iters:
        ddp_utils.all_reduce_sum(log_sums)
        tokens_all = ddp_utils.all_reduce_sum(torch.tensor([float(log_tokens)], device=ctx.device)).item()
        tc.report(logger, ctx, {"iter": state["iter"], "epoch": state["epoch"],
                                "train/value_mse": (log_sums[0] / log_sums[1].clamp(min=1)).item(), "lr": lr,
                                "grad_norm": grad_norm.item(), "tokens_per_s": tokens_all / (time.time() - t_log),
                                "mem_gb": tc.memory_gb(ctx)})
        log_sums.zero_()
        log_tokens, t_log = 0, time.time()

    if state["iter"] % eval_interval == 0 or state["iter"] == max_iters:
        metrics = {"iter": state["iter"], **tc.evaluate(model, val_loader, ctx, autocast, heads=False, value=True)}
        improved = tc.update_best(metrics, state)  # val/loss = value MSE here
        tc.report(logger, ctx, metrics)
        tc.save_run(model, optimizer, state, config, meta, "critic", ctx,
                    ("ckpt.pt", "best.pt") if improved else ("ckpt.pt",), uploader)
        t_log = time.time()

tc.save_run(model, None, state, config, meta, "critic", ctx, ("final.pt",), uploader)
raise SystemExit(tc.finish_run(logger, uploader, ctx))  # 0, or 3: checkpoints missing on S3
