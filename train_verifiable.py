"""
Stage 2 (verifiable): TD-weighted multi-token prediction, the critic trained alongside.

The value head (from a Stage 1 checkpoint) scores every prefix; each completion token's TD
error delta[t] = target - V[t-1] (target = R at the last token, gamma * V[t] elsewhere) says how
much that token changed the chance of success. Tokens that raised it get more weight:
w = clamp(exp(delta / beta), clip_min, clip_max), normalised to mean 1. Head k at position t
takes the weight of its target token t+k+1. The weights come from the current value head,
detached. Loss = weighted MTP CE + value_coef * value MSE.

weight_mode gives the controls that show whether TD weighting itself helps:
  'td' (default), 'uniform' (all 1: the baseline plus a value loss), 'random' (the batch's TD
  weights at random positions), 'shuffled' (each sequence's TD weights permuted within it).

Single device:
    python train_verifiable.py config/arith_verifiable.py
DDP:
    torchrun --standalone --nproc_per_node=4 train_verifiable.py config/mtp7b_verifiable.py
"""

import math
import os
import time

import torch

import ddp_utils
import train_common as tc
from weighting import (build_weights, compute_td_errors, random_like_weights, shift_to_heads, shuffle_within_rows,
                       value_loss, value_mask, weight_stats)

# -----------------------------------------------------------------------------
# settings (override with a config file and --key=value)
# I/O
out_dir = "out/verifiable"
init_from = "out/critic"  # a Stage 1 run (its value head is used); 'resume' | s3://
eval_interval = 100
log_interval = 10
eval_only = False
# data
data_dir = "data/arith"
n_samples: int | None = None
balance_correct = False
correct_ratio = 0.5
max_length = 256
overflow = "truncate"
# weighting
weight_mode = "td"  # 'td' | 'uniform' | 'random' | 'shuffled'
gamma = 1.0  # TD discount
beta = 0.9  # temperature of exp(delta / beta)
clip_min = 0.1
clip_max = 5.0
whiten = False  # whiten the TD errors over the batch's completion tokens first
normalize = True  # mean weight 1 over the batch's completion tokens
value_coef = 0.5  # weight of the value MSE in the total loss
# training
trainable = "all"  # 'all' | 'heads+value_head' (trunk frozen, the 7B setting)
batch_size = 32
gradient_accumulation_steps = 1
n_epochs = 1
max_iters: int | None = None
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 20
lr_decay_iters: int | None = None
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
naive_backward = False
ce_chunk_size = 0
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
wandb_run_name = "verifiable"
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
if weight_mode not in ("td", "uniform", "random", "shuffled"):
    tc.fail(f"weight_mode {weight_mode!r}: use 'td', 'uniform', 'random' or 'shuffled'")
torch.manual_seed(seed + ctx.rank)
autocast = tc.autocast_context(ctx, dtype)

meta, datasets, loaders = tc.build_data(config, ctx)
train_loader, train_sampler = loaders["train"]
val_loader, _ = loaders["val"]

model, resume = tc.init_model(config, ctx, meta, value_head=True)
n = model.n_future_tokens
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
    print(f"verifiable ({weight_mode}): {model.num_params() / 1e6:.2f}M params "
          f"({sum(p.numel() for p in params) / 1e6:.2f}M trainable), {n} heads, {len(datasets['train'])} train rows, "
          f"{max_iters} iters, {ctx.world_size} rank(s) on {ctx.device}")


def token_weights(values, reward, loss_mask):
    """Per-token weights (B, L) for this batch, from the detached values and the weight_mode.
    Also returns the TD errors (for the clip statistics)."""
    td = compute_td_errors(values.detach(), reward, loss_mask, gamma)  # (B, L)
    if weight_mode == "uniform":
        return loss_mask.float(), td
    w = build_weights(td, loss_mask, beta, clip_min, clip_max, whiten, normalize)  # (B, L)
    # the controls draw from the global RNG of the device, which checkpoints save and restore
    if weight_mode == "random":
        w = random_like_weights(w, loss_mask, None)
    elif weight_mode == "shuffled":
        w = shuffle_within_rows(w, loss_mask, None)
    return w, td


if eval_only:
    tc.report(logger, ctx, {"iter": state["iter"], **tc.evaluate(model, val_loader, ctx, autocast, value=True)})
    raise SystemExit(tc.finish_run(logger, uploader, ctx))  # 0, or 3: checkpoints missing on S3

# -----------------------------------------------------------------------------
# training loop
batches = tc.epoch_batches(train_loader, train_sampler, state)
model.train()
log_sums = torch.zeros(2, n, device=ctx.device)  # weighted CE sum, target count per head
log_value = torch.zeros(2, device=ctx.device)  # value squared-error sum, value positions
log_tokens, t_log = 0, time.time()
while state["iter"] < max_iters:
    lr = tc.get_lr(state["iter"], config, max_iters)
    for group in optimizer.param_groups:
        group["lr"] = lr
    log_now = (state["iter"] + 1) % log_interval == 0 or state["iter"] + 1 == max_iters

    for micro_step in range(gradient_accumulation_steps):
        batch = next(batches)
        tokens = batch["input_ids"].to(ctx.device, non_blocking=True)  # (B, L)
        loss_mask = batch["loss_mask"].to(ctx.device, non_blocking=True)  # (B, L)
        reward = batch["reward"].to(ctx.device, non_blocking=True)  # (B,)
        vmask = value_mask(loss_mask)
        with autocast:
            h_trunk = model.trunk_forward(tokens)  # (B, L, dim)
            values = model.value(h_trunk)  # (B, L) fp32
            w_tok, td = token_weights(values, reward, loss_mask)  # (B, L), detached
            v_loss = value_loss(values, reward, vmask)
            out = model.forward_backward(tokens, shift_to_heads(w_tok, n), h_trunk=h_trunk,
                                         extra_loss=value_coef * v_loss, loss_scale=1.0 / gradient_accumulation_steps,
                                         naive=naive_backward, ce_chunk_size=ce_chunk_size)
        log_sums += torch.stack([out["head_losses"] * out["head_counts"], out["head_counts"].float()])
        log_value += torch.stack([v_loss.detach() * vmask.sum(), vmask.sum()])
        log_tokens += int(batch["lengths"].sum())
    ddp_utils.sync_gradients(params)
    grad_norm, stepped = tc.optimizer_step(optimizer, params, grad_clip)
    state["iter"] += 1  # counts attempted steps, so a checkpoint's iter matches its data position
    if tc.too_many_bad_steps(stepped, state, config, logger, ctx):
        tc.save_run(model, optimizer, state, config, meta, "verifiable", ctx, ("ckpt.pt",), uploader)
        tc.finish_run(logger, uploader, ctx)
        raise SystemExit(1)

    if log_now:
        ddp_utils.all_reduce_sum(log_sums)
        ddp_utils.all_reduce_sum(log_value)
        tokens_all = ddp_utils.all_reduce_sum(torch.tensor([float(log_tokens)], device=ctx.device)).item()
        tokens_per_s = tokens_all / (time.time() - t_log)
        head_loss = (log_sums[0] / log_sums[1].clamp(min=1)).tolist()
        stats = weight_stats(w_tok, loss_mask, td if weight_mode == "td" else None, beta, clip_min, clip_max, whiten)
        tc.report(logger, ctx, {"iter": state["iter"], "epoch": state["epoch"], "train/loss": sum(head_loss) / n,
                                "train/head_loss": head_loss,
                                "train/value_mse": (log_value[0] / log_value[1].clamp(min=1)).item(),
                                **{f"weights/{k}": v for k, v in stats.items()},  # last micro-batch of this rank
                                "lr": lr, "grad_norm": grad_norm.item(),
                                "tokens_per_s": tokens_per_s, "mfu": tc.mfu(model, ctx, dtype, tokens_per_s, max_length),
                                "mem_gb": tc.memory_gb(ctx)})
        log_sums.zero_()
        log_value.zero_()
        log_tokens, t_log = 0, time.time()

    if state["iter"] % eval_interval == 0 or state["iter"] == max_iters:
        metrics = {"iter": state["iter"], **tc.evaluate(model, val_loader, ctx, autocast, value=True)}
        improved = tc.update_best(metrics, state)  # val/loss = uniform MTP CE, comparable across stages
        tc.report(logger, ctx, metrics)
        tc.save_run(model, optimizer, state, config, meta, "verifiable", ctx,
                    ("ckpt.pt", "best.pt") if improved else ("ckpt.pt",), uploader)
        t_log = time.time()

tc.save_run(model, None, state, config, meta, "verifiable", ctx, ("final.pt",), uploader)
raise SystemExit(tc.finish_run(logger, uploader, ctx))  # 0, or 3: checkpoints missing on S3
