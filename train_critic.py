"""
Stage 1 (critic): train the value head alone, so Stage 2 starts from a critic that already
tells good solutions from bad ones.

Only the trunk runs (no head logits are computed) and it is frozen; the value head V[b,t]
regresses the sample's reward R[b] (1 correct, 0 not) at the last prompt position and every
completion position: loss = mean (V[b,t] - R[b])^2. value_target='prefix' trains a dense critic
on the verifier's step labels instead: the target is 1 at the positions before the row's first
wrong step and 0 from it on. Validation reports how well V at the last token separates correct
from incorrect samples (accuracy at 0.5 and AUC) and, on data with step labels, how well V at
every position separates on-track from off-track prefixes (token AUC).

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
from data.format import fail
from evaluation import evaluate_all_ranks
from weighting import on_track, value_loss, value_mask

# -----------------------------------------------------------------------------
# settings (override with a config file and --key=value)
# I/O
out_dir = "out/critic"  # checkpoints and metrics.jsonl go here
init_from = "out/base"  # the policy whose trunk the critic reads: run dir, checkpoint, Meta/HF dir, 'resume', s3://
eval_interval = 100  # iterations between validations (and checkpoints)
log_interval = 10  # iterations between log lines
eval_only = False  # evaluate init_from once, log, exit
# data
data_dir = "data/arith"  # a prepared dataset (data/*/prepare.py)
n_samples: int | None = None  # use at most this many training rows (None: all)
balance_correct = True  # a critic needs both labels: sample them at correct_ratio
correct_ratio = 0.5  # fraction of correct rows when balance_correct (1.0: correct only)
max_length = 256  # tokens per row; longer rows are cut or dropped (see overflow)
overflow = "truncate"  # 'truncate' | 'drop'
value_target = "reward"  # 'reward' (R at every position) | 'prefix' (1 before the first wrong step, 0 from it on)
# training
trainable = "value_head"  # 'value_head' (trunk frozen, as the stage is defined) | 'all'
batch_size = 32  # sequences per micro-step per rank
gradient_accumulation_steps = 1  # micro-steps per optimizer step
n_epochs = 1  # used when max_iters is None
max_iters: int | None = None  # None: n_epochs over the training set
learning_rate = 1e-3  # peak learning rate, after the linear warm-up
min_lr = 1e-4  # the cosine decay ends here (at lr_decay_iters)
warmup_iters = 20  # linear warm-up steps
lr_decay_iters: int | None = None  # None: max_iters
weight_decay = 0.0  # AdamW weight decay on matrices (not norms or biases)
beta1 = 0.9  # AdamW betas
beta2 = 0.95  # AdamW betas
grad_clip = 1.0  # 0: no clipping (the norm is still computed to catch non-finite gradients)
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
wandb_run_name = "critic"  # wandb run name
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
if value_target not in ("reward", "prefix"):
    fail(f"value_target {value_target!r}: use 'reward' or 'prefix'")
tc.check_storage_all_ranks(out_dir, init_from, fsdp, ctx)  # several machines: out_dir where each needs it?
torch.manual_seed(seed + ctx.rank)
autocast = ddp_utils.autocast_context(ctx, dtype)

meta, datasets, loaders = tc.build_data(data_dir, ctx, batch_size, max_length, overflow, seed, n_samples,
                                        balance_correct, correct_ratio)
train_loader, train_sampler = loaders["train"]
val_loader, _ = loaders["val"]
if value_target == "prefix" and not datasets["train"].has_step_labels:
    fail(f"value_target='prefix' needs step labels: {data_dir} has none (data/arith/prepare.py writes them)")

model, resume = tc.init_model(init_from, ctx, meta, out_dir, value_head=True,  # a fresh value head unless init_from has one
                              pad_vocab_multiple=pad_vocab_multiple, stage="critic")
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
    print(f"critic: {sum(p.numel() for p in params) / 1e6:.3f}M trainable params, {len(datasets['train'])} train rows, "
          f"{max_iters} iters, {ctx.world_size} rank(s) on {ctx.device}")


def save_all_ranks(names, optimizer=optimizer):
    """The run checkpoint to out_dir/names (every rank calls this), then wait for it on every rank."""
    tc.save_run_all_ranks(model, optimizer, state, config, meta, "critic", ctx, out_dir, names, uploader)
    ddp_utils.barrier()


if eval_only:
    metrics = evaluate_all_ranks(model, val_loader, ctx, autocast, heads=False, value=True, value_target=value_target)
    tc.report(logger, ctx, {"iter": state["iter"], **metrics})
    raise SystemExit(tc.finish_run(logger, uploader, ctx))  # 0, or 3: checkpoints missing on S3

# -----------------------------------------------------------------------------
# training loop
train_sampler.set_epoch(state["epoch"])  # this epoch's shuffle (the same on every rank) ...
train_sampler.set_skip(state["sampler_pos"])  # ... minus what a resumed run already read of it
train_iter = iter(train_loader)
model.train()
log_loss = torch.zeros((), device=ctx.device)  # value MSE summed over the steps since the last log
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
    # the normaliser: value positions in the whole step, all micro-batches and ranks (/ world_size:
    # sync_gradients averages the ranks' gradients), so any split of the rows gives one gradient
    n_value = sum(value_mask(b["loss_mask"]).sum() for b in micro_batches).to(ctx.device)
    n_value = ddp_utils.all_reduce_sum(n_value).clamp(min=1) / ctx.world_size

    for batch in micro_batches:
        tokens = batch["input_ids"].to(ctx.device, non_blocking=True)  # (B, L)
        loss_mask = batch["loss_mask"].to(ctx.device, non_blocking=True)  # (B, L)
        reward = batch["reward"].to(ctx.device, non_blocking=True)  # (B,)
        target = on_track(batch["first_error"].to(ctx.device), tokens.shape[1]) if value_target == "prefix" else reward
        with autocast:
            h_trunk = model.trunk_forward(tokens)  # (B, L, dim); no graph when the trunk is frozen
        values = model.value(h_trunk)  # (B, L) fp32
        loss = value_loss(values, target, value_mask(loss_mask), count=n_value)  # MSE over the step's value positions
        loss.backward()
        log_loss += loss.detach()
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
        tokens_all = ddp_utils.all_reduce_sum(torch.tensor([float(log_tokens)], device=ctx.device)).item()
        tc.report(logger, ctx, {"iter": state["iter"], "epoch": state["epoch"],
                                "train/value_mse": (log_loss / (log_steps * ctx.world_size)).item(), "lr": lr,
                                "grad_norm": grad_norm.item(), "tokens_per_s": tokens_all / (time.time() - t_log),
                                "mem_gb": ddp_utils.memory_gb(ctx)})
        log_loss.zero_()
        log_steps, log_tokens, t_log = 0, 0, time.time()

    if state["iter"] % eval_interval == 0 or state["iter"] == max_iters:
        metrics = {"iter": state["iter"],
                   **evaluate_all_ranks(model, val_loader, ctx, autocast, heads=False, value=True, value_target=value_target)}
        improved = tc.update_best(metrics, state)  # val/loss = value MSE here
        tc.report(logger, ctx, metrics)
        save_all_ranks(("ckpt.pt", "best.pt") if improved else ("ckpt.pt",))
        t_log = time.time()

save_all_ranks(("final.pt",), optimizer=None)  # weights only
raise SystemExit(tc.finish_run(logger, uploader, ctx))  # 0, or 3: checkpoints missing on S3
