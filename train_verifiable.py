"""
Stage 2 (verifiable): TD-weighted multi-token prediction, the critic trained alongside.

The value head (from a Stage 1 checkpoint) scores every prefix; each completion token's TD
error delta[t] = target - V[t-1] (target = R at the last token, gamma * V[t] elsewhere) says how
much that token changed the chance of success. Tokens that raised it get more weight:
w = clamp(exp(delta / beta), clip_min, clip_max), normalised to mean 1. Head k at position t
takes the weight of its target token t+k+1. Loss = weighted MTP CE + value_coef * value MSE.

weight_mode: 'td' (default); controls that keep the weights but lose their positions: 'uniform'
(all 1), 'random' (the batch's TD weights at random positions), 'shuffled' (each row's TD weights
permuted within it); positive controls from the verifier's step labels: 'oracle_prefix' (1 before
a row's first wrong step, 0 from it on; correct rows all 1), 'oracle_td' (the TD weights of a
perfect prefix critic: V = 1 while the prefix is right, 0 after), 'reward' (w = R: correct rows only).

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
from data.format import fail
from evaluation import evaluate_all_ranks
from weighting import WEIGHT_MODES, on_track, shift_to_heads, stage2_weights, value_loss, value_mask, weight_stats

# -----------------------------------------------------------------------------
# settings (override with a config file and --key=value)
# I/O
out_dir = "out/verifiable"  # checkpoints and metrics.jsonl go here
init_from = "out/critic"  # a Stage 1 run (its value head is used); 'resume' | s3://
eval_interval = 100  # iterations between validations (and checkpoints)
log_interval = 10  # iterations between log lines
eval_only = False  # evaluate init_from once, log, exit
# data
data_dir = "data/arith"  # a prepared dataset (data/*/prepare.py)
n_samples: int | None = None  # use at most this many training rows (None: all)
balance_correct = False  # sample correct/incorrect rows at correct_ratio
correct_ratio = 0.5  # fraction of correct rows when balance_correct (1.0: correct only)
max_length = 256  # tokens per row; longer rows are cut or dropped (see overflow)
overflow = "truncate"  # 'truncate' (cut the completion) | 'drop'
# weighting
weight_mode = "td"  # 'td' | 'uniform' | 'random' | 'shuffled' | 'oracle_prefix' | 'oracle_td' | 'reward'
value_target = "reward"  # the value head's target: 'reward' (R at every position) | 'prefix' (a prefix critic:
#   1 before the row's first wrong step, 0 from it on; needs step labels; use with train_critic's prefix)
gamma = 1.0  # TD discount
beta = 0.9  # temperature of exp(delta / beta)
clip_min = 0.1  # weights clamped to [clip_min, clip_max] before normalisation
clip_max = 5.0  # weights clamped to [clip_min, clip_max] before normalisation
whiten = False  # whiten the TD errors over the population's completion tokens first
normalize = True  # mean weight 1 over the population's completion tokens
weight_scope = "step"  # the population of whiten/normalize (and of 'random'): 'step' (all micro-batches of
#   the step on every rank: any split of the rows gives the same gradient; one extra no-grad trunk forward per
#   micro-batch when the step has more than one) | 'micro_batch' (each on its own: cheaper, split-dependent)
value_coef = 0.5  # weight of the value MSE in the total loss
# training
trainable = "all"  # 'all' | 'heads+value_head' (trunk frozen, the 7B setting)
batch_size = 32  # sequences per micro-step per rank
gradient_accumulation_steps = 1  # micro-steps per optimizer step
n_epochs = 1  # used when max_iters is None
max_iters: int | None = None  # optimizer steps (None: n_epochs over the training set)
learning_rate = 1e-3  # peak learning rate, after the linear warm-up
min_lr = 1e-4  # the cosine decay ends here (at lr_decay_iters)
warmup_iters = 20  # linear warm-up steps
lr_decay_iters: int | None = None  # None: max_iters
weight_decay = 0.1  # AdamW weight decay on matrices (not norms or biases)
beta1 = 0.9  # AdamW betas
beta2 = 0.95  # AdamW betas
grad_clip = 1.0  # 0: no clipping (the norm is still computed to catch non-finite gradients)
naive_backward = False  # True: backprop all heads at once (comparison); False: the sequential head backward
ce_chunk_size = 0  # tokens per cross-entropy chunk (0: plain logits); e.g. 4096 for a 32k vocab
max_bad_steps = 10  # consecutive non-finite steps before the run stops
# system
device = "auto"  # 'auto' (cuda > mps > cpu) | 'cuda' | 'cuda:1' | 'mps' | 'cpu'
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # 'float32' | 'bfloat16'
compile = False  # torch.compile the transformer blocks
pad_vocab_multiple = 64 if torch.cuda.is_available() else 1  # vocab rows padded for GPU matmuls (padded ids masked)
fsdp = False  # FSDP2 sharding of the blocks (see train_baseline.py)
seed = 1337  # data order, initialisation, sampling (rank r uses seed + r)
wandb_log = False  # also log to wandb (WANDB_MODE=offline works)
wandb_project = "wmtp"  # wandb project
wandb_run_name = "verifiable"  # wandb run name
s3_uri: str | None = None  # 's3://bucket/prefix': rank 0 uploads checkpoints in the background
s3_keep = 3  # newest checkpoints kept on S3 (plus the best)
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
config = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))}
# -----------------------------------------------------------------------------

try:
    ctx = ddp_utils.setup(device, fsdp)
except ValueError as e:
    fail(e)
tc.check_config(config, ctx)
if weight_mode not in WEIGHT_MODES or value_target not in ("reward", "prefix"):
    fail(f"weight_mode {weight_mode!r} / value_target {value_target!r}: use one of {', '.join(WEIGHT_MODES)} / "
         "'reward' or 'prefix'")
if weight_scope not in ("micro_batch", "step"):
    fail(f"weight_scope {weight_scope!r}: use 'micro_batch' or 'step'")
tc.check_storage_all_ranks(out_dir, init_from, fsdp, ctx)  # several machines: out_dir where each needs it?
torch.manual_seed(seed + ctx.rank)
autocast = ddp_utils.autocast_context(ctx, dtype)

meta, datasets, loaders = tc.build_data(data_dir, ctx, batch_size, max_length, overflow, seed, n_samples,
                                        balance_correct, correct_ratio)
train_loader, train_sampler = loaders["train"]
val_loader, _ = loaders["val"]
if (weight_mode.startswith("oracle") or value_target == "prefix") and not datasets["train"].has_step_labels:
    fail(f"weight_mode={weight_mode!r} / value_target={value_target!r} need step labels: {data_dir} has none "
         "(data/arith/prepare.py writes them)")

model, resume = tc.init_model(init_from, ctx, meta, out_dir, value_head=True, pad_vocab_multiple=pad_vocab_multiple,
                              stage="verifiable")
n = model.n_future_tokens
tc.set_trainable(model, trainable)
ddp_utils.place_model(model, ctx, dtype)  # fsdp: each block sharded over the ranks, the rest replicated
params = [p for p in model.parameters() if p.requires_grad]  # after place_model: fsdp swaps in shards
ddp_utils.broadcast_parameters(model)
tc.maybe_compile(model, compile)
optimizer = model.configure_optimizer(weight_decay, learning_rate, (beta1, beta2), ctx.device_type)
state = tc.restore_state(resume, optimizer, ctx, model)
if max_iters is None:
    max_iters = n_epochs * math.ceil(len(train_loader) / gradient_accumulation_steps)
config.update(max_iters=max_iters, lr_decay_iters=lr_decay_iters or max_iters)  # the derived values too
logger, uploader = tc.start_run(out_dir, ctx, config, wandb_log, wandb_project, wandb_run_name, s3_uri, s3_keep)
ddp_utils.barrier()  # out_dir exists before any rank goes on
if ctx.master:
    print(f"verifiable ({weight_mode}): {model.num_params() / 1e6:.2f}M params "
          f"({sum(p.numel() for p in params) / 1e6:.2f}M trainable), {n} heads, {len(datasets['train'])} train rows, "
          f"{max_iters} iters, {ctx.world_size} rank(s) on {ctx.device}")


def save_all_ranks(names, optimizer=optimizer):
    """The run checkpoint to out_dir/names (every rank calls this), then wait for it on every rank."""
    tc.save_run_all_ranks(model, optimizer, state, config, meta, "verifiable", ctx, out_dir, names, uploader)
    ddp_utils.barrier()


def token_weights(values, reward, loss_mask, first_error, reduce=None):
    """weighting.stage2_weights of this run's settings: (weights (B, L), TD errors or None)."""
    return stage2_weights(weight_mode, values, reward, loss_mask, first_error, gamma, beta, clip_min, clip_max, whiten,
                          normalize, reduce)


@torch.no_grad()
def step_token_weights(micro_batches):
    """weight_scope='step': every micro-batch's (weights, TD errors) from one no-grad pass of the
    trunk and value head, the step's rows padded to one length and weighted as one population over
    all ranks. The values are those the training forward computes (same weights, same rows)."""
    masks = [b["loss_mask"].to(ctx.device) for b in micro_batches]
    with autocast:
        values = [model.value(model.trunk_forward(b["input_ids"].to(ctx.device))) for b in micro_batches]  # (B, l)
    w, td = token_weights(tc.cat_padded(values), torch.cat([b["reward"] for b in micro_batches]).to(ctx.device),
                          tc.cat_padded(masks), torch.cat([b["first_error"] for b in micro_batches]).to(ctx.device),
                          ddp_utils.all_reduce_sum)
    return list(zip(tc.split_padded(w, masks), tc.split_padded(td, masks) if td is not None else [None] * len(masks)))


if eval_only:
    tc.report(logger, ctx, {"iter": state["iter"], **evaluate_all_ranks(model, val_loader, ctx, autocast, value=True, value_target=value_target)})
    raise SystemExit(tc.finish_run(logger, uploader, ctx))  # 0, or 3: checkpoints missing on S3

# -----------------------------------------------------------------------------
# training loop
train_sampler.set_epoch(state["epoch"])  # this epoch's shuffle (the same on every rank) ...
train_sampler.set_skip(state["sampler_pos"])  # ... minus what a resumed run already read of it
train_iter = iter(train_loader)
model.train()
log_loss = torch.zeros(n + 1, device=ctx.device)  # per-head weighted CE and the value MSE, summed over steps
log_track = torch.zeros(4, device=ctx.device)  # weight sum and count on tokens before / from the first wrong step
log_steps, log_tokens, t_log = 0, 0, time.time()
while state["iter"] < max_iters:
    lr = tc.get_lr(state["iter"], learning_rate, min_lr, warmup_iters, lr_decay_iters or max_iters)
    for group in optimizer.param_groups:
        group["lr"] = lr

    # this step's micro-batches; a new epoch reshuffles
    micro_batches = []
    for _ in range(gradient_accumulation_steps):
        batch = next(train_iter, None)
        if batch is None:
            state["epoch"], state["sampler_pos"] = state["epoch"] + 1, 0
            train_sampler.set_epoch(state["epoch"])
            train_iter = iter(train_loader)
            batch = next(train_iter)
        state["sampler_pos"] += len(batch["index"])
        micro_batches.append(batch)
    # normalisers over the whole step, all micro-batches and ranks (one small all-reduce; / world_size
    # because sync_gradients averages the ranks' gradients): each head's targets, the value positions
    counts = torch.cat([sum(shift_to_heads(b["loss_mask"], n).sum(dim=(0, 1)) for b in micro_batches),
                        sum(value_mask(b["loss_mask"]).sum() for b in micro_batches)[None]]).to(ctx.device)
    counts = ddp_utils.all_reduce_sum(counts).clamp(min=1) / ctx.world_size
    n_targets, n_value = counts[:n], counts[n]  # (n,), ()
    one_batch = len(micro_batches) == 1 and ctx.world_size == 1  # then the step is the micro-batch
    step_weights = step_token_weights(micro_batches) if weight_scope == "step" and not one_batch else None

    for i, batch in enumerate(micro_batches):
        tokens = batch["input_ids"].to(ctx.device, non_blocking=True)  # (B, L)
        loss_mask = batch["loss_mask"].to(ctx.device, non_blocking=True)  # (B, L)
        reward = batch["reward"].to(ctx.device, non_blocking=True)  # (B,)
        first_error = batch["first_error"].to(ctx.device, non_blocking=True)  # (B,) -1: none
        prefix_ok = on_track(first_error, tokens.shape[1])  # (B, L) 1 before the first wrong step
        with autocast:
            h_trunk = model.trunk_forward(tokens)  # (B, L, dim)
            values = model.value(h_trunk)  # (B, L) fp32
            w_tok, td = (token_weights(values, reward, loss_mask, first_error) if step_weights is None
                         else step_weights[i])
            w_heads = shift_to_heads(w_tok, n)  # (B, L, n): head k at t takes the weight of its target t+k+1

            def head_loss(k, ce_k):  # weighted CE of head k (B, L), over the step's target count
                return (w_heads[..., k] * ce_k).sum() / n_targets[k]

            v_loss = value_loss(values, prefix_ok if value_target == "prefix" else reward, value_mask(loss_mask),
                                count=n_value)  # MSE over the step
            log_loss[:n] += model.forward_backward(tokens, head_loss, h_trunk=h_trunk, extra_loss=value_coef * v_loss,
                                                   naive=naive_backward, ce_chunk_size=ce_chunk_size)
        log_loss[n] += v_loss.detach()
        on, off = loss_mask * prefix_ok, loss_mask * (1 - prefix_ok)  # completion tokens before / from the error
        log_track += torch.stack([(w_tok * on).sum(), on.sum(), (w_tok * off).sum(), off.sum()])
        log_tokens += int(batch["lengths"].sum())
    ddp_utils.sync_gradients(params)
    grad_norm, stepped = ddp_utils.optimizer_step(optimizer, params, grad_clip)
    state["iter"] += 1  # counts attempted steps, so a checkpoint's iter matches its data position
    log_steps += 1
    if tc.too_many_bad_steps(stepped, state, max_bad_steps, out_dir, logger, ctx):
        save_all_ranks(("ckpt.pt",))
        raise SystemExit(tc.finish_run(logger, uploader, ctx, code=1))

    if state["iter"] % log_interval == 0 or state["iter"] == max_iters:
        ddp_utils.all_reduce_sum(log_loss)  # each rank holds its share of every step's loss
        w_on, n_on, w_off, n_off = ddp_utils.all_reduce_sum(log_track).tolist()
        tokens_all = ddp_utils.all_reduce_sum(torch.tensor([float(log_tokens)], device=ctx.device)).item()
        tokens_per_s = tokens_all / (time.time() - t_log)
        losses = (log_loss / (log_steps * ctx.world_size)).tolist()  # means over the steps logged
        stats = weight_stats(w_tok, loss_mask, td if weight_mode in ("td", "oracle_td") else None, beta, clip_min,
                             clip_max, whiten)
        stats.update(mean_on_track=w_on / n_on if n_on else None, mean_off_track=w_off / n_off if n_off else None)
        tc.report(logger, ctx, {"iter": state["iter"], "epoch": state["epoch"], "train/loss": sum(losses[:n]) / n,
                                "train/head_loss": losses[:n], "train/value_mse": losses[n],
                                **{f"weights/{k}": v for k, v in stats.items()},  # last micro-batch of this rank
                                "lr": lr, "grad_norm": grad_norm.item(),
                                "tokens_per_s": tokens_per_s, "mfu": tc.mfu(model, ctx, dtype, tokens_per_s, max_length),
                                "mem_gb": ddp_utils.memory_gb(ctx)})
        log_loss.zero_()
        log_track.zero_()
        log_steps, log_tokens, t_log = 0, 0, time.time()

    if state["iter"] % eval_interval == 0 or state["iter"] == max_iters:
        metrics = {"iter": state["iter"], **evaluate_all_ranks(model, val_loader, ctx, autocast, value=True, value_target=value_target)}
        improved = tc.update_best(metrics, state)  # val/loss = uniform MTP CE, comparable across stages
        tc.report(logger, ctx, metrics)
        save_all_ranks(("ckpt.pt", "best.pt") if improved else ("ckpt.pt",))
        t_log = time.time()

save_all_ranks(("final.pt",), optimizer=None)  # weights only
raise SystemExit(tc.finish_run(logger, uploader, ctx))  # 0, or 3: checkpoints missing on S3
