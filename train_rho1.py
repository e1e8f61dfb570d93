"""
Stage 3 (Rho-1): selective multi-token prediction against a frozen reference model.

excess[b,t,k] = ce_policy[b,t,k] - ce_reference[b,t,k]: targets the reference already predicts
well but the policy does not are the ones worth learning. Head 0 trains on every target; each
head k >= 1 trains only on the top k_percent of its valid targets in the batch by excess loss.
Loss per head = sum(w * ce) / sum(w), averaged over heads.

The reference (a checkpoint of any stage, or a Meta directory) is frozen: eval(), no gradients,
never wrapped or synced. It never changes, so its per-token losses are computed once per sample
and cached (ref_cache=True): after the first epoch no reference forward runs at all.

Single device:
    python train_rho1.py config/arith_rho1.py
DDP:
    torchrun --standalone --nproc_per_node=4 train_rho1.py config/mtp7b_rho1.py
"""

import functools
import math
import os
import time

import torch

import ddp_utils
import train_common as tc
from model import Transformer
from weighting import head_targets_mask, rho1_head_weights

# -----------------------------------------------------------------------------
# settings (override with a config file and --key=value)
# I/O
out_dir = "out/rho1"
init_from = "out/base"  # the policy: run dir, checkpoint, Meta dir, 'resume', s3://
ref_init_from = "out/reference"  # the frozen reference model (run dir, checkpoint or Meta dir)
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
# selection
k_percent = 0.6  # fraction of each head k >= 1's valid targets trained on, by largest excess loss
ref_cache = True  # cache the reference's per-token losses per sample (CPU, float32: 4*n bytes per token)
# training
trainable = "all"  # 'all' | 'heads'
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
wandb_run_name = "rho1"
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
if not 0 < k_percent <= 1:
    tc.fail(f"k_percent must be in (0, 1], got {k_percent}")
torch.manual_seed(seed + ctx.rank)
autocast = tc.autocast_context(ctx, dtype)

meta, datasets, loaders = tc.build_data(config, ctx)
train_loader, train_sampler = loaders["train"]
val_loader, _ = loaders["val"]

model, resume = tc.init_model(config, ctx, meta, value_head=False)
n = model.n_future_tokens
tc.set_trainable(model, trainable)
tc.place_model(model, ctx, dtype)  # fsdp: each block sharded over the ranks, the rest replicated
params = [p for p in model.parameters() if p.requires_grad]  # after place_model: fsdp swaps in shards
ddp_utils.broadcast_parameters(model)
tc.maybe_compile(model, compile)
optimizer = tc.configure_optimizer(params, config, ctx)
state = tc.restore_state(resume, optimizer, ctx, model)

# the frozen reference: its own copy on every rank, in the compute dtype, outside any sync; never
# sharded, also with fsdp (inference only: 2 bytes/param in bf16, 13.5 GB for 7B; ref_cache runs it once per row)
try:
    ref_model = Transformer.load(ref_init_from, device=ctx.device, dtype=tc.PTDTYPE[dtype], value_head=False)
except (FileNotFoundError, ValueError) as e:
    tc.fail(f"ref_init_from={ref_init_from!r}: {e}")
if ref_model.args.vocab_size != model.args.vocab_size or ref_model.n_future_tokens != n:
    tc.fail(f"reference {ref_init_from} has vocab {ref_model.args.vocab_size} and {ref_model.n_future_tokens} heads; "
            f"the policy has vocab {model.args.vocab_size} and {n} heads (they must match)")
ref_model.pad_vocab(pad_vocab_multiple).eval().requires_grad_(False)
cache = {}  # dataset row index -> (length, n) reference CE, float32 on the CPU

if max_iters is None:
    max_iters = n_epochs * math.ceil(len(train_loader) / gradient_accumulation_steps)
logger, uploader = tc.start_run(config, ctx)
if ctx.master:
    print(f"rho1: {model.num_params() / 1e6:.2f}M params ({sum(p.numel() for p in params) / 1e6:.2f}M trainable), "
          f"{n} heads, k_percent={k_percent}, reference {ref_init_from}, {len(datasets['train'])} train rows, "
          f"{max_iters} iters, {ctx.world_size} rank(s) on {ctx.device}")


@torch.no_grad()
def reference_ce(batch, tokens):
    """ce_reference (B, L, n) of this batch: from the cache when every row is in it, else one
    reference forward (one head's logits at a time), whose rows are then cached."""
    rows, lengths = batch["index"].tolist(), batch["lengths"].tolist()
    if ref_cache and all(r in cache for r in rows):
        out = torch.zeros(tokens.shape[0], tokens.shape[1], n)
        for b, r in enumerate(rows):
            out[b, : lengths[b]] = cache[r]
        return out.to(ctx.device, non_blocking=True)
    with autocast:
        h = ref_model.trunk_forward(tokens)
        ce = torch.stack([ref_model.head_cross_entropy(ref_model.head_forward(h, k), tokens, k, ce_chunk_size)
                          for k in range(n)], dim=-1)  # (B, L, n)
    if ref_cache:
        ce_cpu = ce.float().cpu()
        for b, r in enumerate(rows):
            cache[r] = ce_cpu[b, : lengths[b]].clone()
    return ce.float()


if eval_only:
    tc.report(logger, ctx, {"iter": state["iter"], **tc.evaluate(model, val_loader, ctx, autocast)})
    raise SystemExit(tc.finish_run(logger, uploader, ctx))  # 0, or 3: checkpoints missing on S3

# -----------------------------------------------------------------------------
# training loop
batches = tc.epoch_batches(train_loader, train_sampler, state)
model.train()
log_sums = torch.zeros(3, n, device=ctx.device)  # selected CE sum, selected count, valid count per head
log_tokens, t_log = 0, time.time()
while state["iter"] < max_iters:
    lr = tc.get_lr(state["iter"], config, max_iters)
    for group in optimizer.param_groups:
        group["lr"] = lr

    for micro_step in range(gradient_accumulation_steps):
        batch = next(batches)
        tokens = batch["input_ids"].to(ctx.device, non_blocking=True)  # (B, L)
        targets = head_targets_mask(batch["loss_mask"].to(ctx.device, non_blocking=True), n)  # (B, L, n)
        ref_ce = reference_ce(batch, tokens)  # (B, L, n)

        # head k's 0/1 weights from its own detached CE: head 0 all targets, heads k >= 1 the top
        # k_percent by excess loss ce_k - ref_ce[..., k]
        rho1_weights = functools.partial(rho1_head_weights, targets=targets, ref_ce=ref_ce, k_percent=k_percent)
        with autocast:
            out = model.forward_backward(tokens, rho1_weights, loss_scale=1.0 / gradient_accumulation_steps,
                                         naive=naive_backward, ce_chunk_size=ce_chunk_size)
        log_sums += torch.stack([out["head_losses"] * out["head_counts"], out["head_counts"].float(),
                                 targets.sum(dim=(0, 1)).float()])
        log_tokens += int(batch["lengths"].sum())
    ddp_utils.sync_gradients(params)
    grad_norm, stepped = tc.optimizer_step(optimizer, params, grad_clip)
    state["iter"] += 1  # counts attempted steps, so a checkpoint's iter matches its data position
    if tc.too_many_bad_steps(stepped, state, config, logger, ctx):
        tc.save_run(model, optimizer, state, config, meta, "rho1", ctx, ("ckpt.pt",), uploader)
        tc.finish_run(logger, uploader, ctx)
        raise SystemExit(1)

    if state["iter"] % log_interval == 0 or state["iter"] == max_iters:
        ddp_utils.all_reduce_sum(log_sums)
        tokens_all = ddp_utils.all_reduce_sum(torch.tensor([float(log_tokens)], device=ctx.device)).item()
        tokens_per_s = tokens_all / (time.time() - t_log)
        head_loss = (log_sums[0] / log_sums[1].clamp(min=1)).tolist()
        tc.report(logger, ctx, {"iter": state["iter"], "epoch": state["epoch"], "train/loss": sum(head_loss) / n,
                                "train/head_loss": head_loss,
                                "rho1/selected_frac": (log_sums[1] / log_sums[2].clamp(min=1)).tolist(),
                                "rho1/cached_rows": len(cache), "lr": lr, "grad_norm": grad_norm.item(),
                                "tokens_per_s": tokens_per_s, "mfu": tc.mfu(model, ctx, dtype, tokens_per_s, max_length),
                                "mem_gb": tc.memory_gb(ctx)})
        log_sums.zero_()
        log_tokens, t_log = 0, time.time()

    if state["iter"] % eval_interval == 0 or state["iter"] == max_iters:
        metrics = {"iter": state["iter"], **tc.evaluate(model, val_loader, ctx, autocast)}
        improved = tc.update_best(metrics, state)
        tc.report(logger, ctx, metrics)
        tc.save_run(model, optimizer, state, config, meta, "rho1", ctx,
                    ("ckpt.pt", "best.pt") if improved else ("ckpt.pt",), uploader)
        t_log = time.time()

tc.save_run(model, None, state, config, meta, "rho1", ctx, ("final.pt",), uploader)
raise SystemExit(tc.finish_run(logger, uploader, ctx))  # 0, or 3: checkpoints missing on S3
