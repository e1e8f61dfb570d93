"""
Stage 3 (Rho-1): selective multi-token prediction against a frozen reference model.

excess[b,t,k] = ce_policy[b,t,k] - ce_reference[b,t,k]: targets the reference already predicts
well but the policy does not are the ones worth learning. Head 0 trains on every target; each
head k >= 1 trains only on the top k_percent of its valid targets by excess loss, selected over
the whole optimizer step on every rank (selection_scope='step') or in each micro-batch
('micro_batch'). Loss per head = sum(w * ce) / sum(w) over the step, averaged over heads.

The reference (a checkpoint of any stage, or a Meta directory) is frozen: eval(), no gradients,
never wrapped or synced. It never changes, so its per-token losses are computed once per sample
and cached (ref_cache=True): after the first epoch no reference forward runs at all.

Single device:
    python train_rho1.py config/arith_rho1.py
DDP:
    torchrun --standalone --nproc_per_node=4 train_rho1.py config/mtp7b_rho1.py
"""

import math
import os
import time

import torch

import ddp_utils
import train_common as tc
from data.format import fail
from evaluation import evaluate_all_ranks
from model import Transformer
from weighting import compute_mtp_selective_weights, n_selected, select_top_k, shift_to_heads

# -----------------------------------------------------------------------------
# settings (override with a config file and --key=value)
# I/O
out_dir = "out/rho1"  # checkpoints and metrics.jsonl go here
init_from = "out/base"  # the policy: run dir, checkpoint, Meta/HF dir, 'resume', s3://
ref_init_from = "out/reference"  # the frozen reference model (run dir, checkpoint or Meta/HF dir)
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
# selection
k_percent = 0.6  # fraction of each head k >= 1's valid targets trained on, by largest excess loss
ref_cache = True  # cache the reference's per-token losses per sample (CPU, float32: 4*n bytes per token)
selection_scope = "step"  # where the top k_percent is taken: 'step' (all micro-batches of the step on every
#   rank: any split of the rows gives the same gradient; one extra no-grad policy forward per micro-batch when
#   the step has more than one) | 'micro_batch' (each on its own: cheaper, split-dependent)
# training
trainable = "all"  # 'all' | 'heads'
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
wandb_run_name = "rho1"  # wandb run name
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
if not 0 < k_percent <= 1:
    fail(f"k_percent must be in (0, 1], got {k_percent}")
if selection_scope not in ("micro_batch", "step"):
    fail(f"selection_scope {selection_scope!r}: use 'micro_batch' or 'step'")
tc.check_storage_all_ranks(out_dir, init_from, fsdp, ctx)  # several machines: out_dir where each needs it?
torch.manual_seed(seed + ctx.rank)
autocast = ddp_utils.autocast_context(ctx, dtype)

meta, datasets, loaders = tc.build_data(data_dir, ctx, batch_size, max_length, overflow, seed, n_samples,
                                        balance_correct, correct_ratio)
train_loader, train_sampler = loaders["train"]
val_loader, _ = loaders["val"]

model, resume = tc.init_model(init_from, ctx, meta, out_dir, value_head=False, pad_vocab_multiple=pad_vocab_multiple,
                              stage="rho1")
n = model.n_future_tokens
tc.set_trainable(model, trainable)
ddp_utils.place_model(model, ctx, dtype)  # fsdp: each block sharded over the ranks, the rest replicated
params = [p for p in model.parameters() if p.requires_grad]  # after place_model: fsdp swaps in shards
ddp_utils.broadcast_parameters(model)
tc.maybe_compile(model, compile)
optimizer = model.configure_optimizer(weight_decay, learning_rate, (beta1, beta2), ctx.device_type)
state = tc.restore_state(resume, optimizer, ctx, model)

# the frozen reference: its own copy on every rank, in the compute dtype, outside any sync; never
# sharded, also with fsdp (inference only: 2 bytes/param in bf16, 13.5 GB for 7B; ref_cache runs it once per row)
try:
    ref_model = Transformer.load(ref_init_from, device=ctx.device, dtype=ddp_utils.PTDTYPE[dtype], value_head=False)
except (FileNotFoundError, ValueError) as e:
    fail(f"ref_init_from={ref_init_from!r}: {e}")
if ref_model.args.vocab_size != model.args.vocab_size or ref_model.n_future_tokens != n:
    fail(f"reference {ref_init_from} has vocab {ref_model.args.vocab_size} and {ref_model.n_future_tokens} heads; "
         f"the policy has vocab {model.args.vocab_size} and {n} heads (they must match)")
ref_model.pad_vocab(pad_vocab_multiple).eval().requires_grad_(False)
cache = {}  # dataset row index -> (length, n) reference CE, float32 on the CPU

if max_iters is None:
    max_iters = n_epochs * math.ceil(len(train_loader) / gradient_accumulation_steps)
config.update(max_iters=max_iters, lr_decay_iters=lr_decay_iters or max_iters)  # the derived values too
logger, uploader = tc.start_run(out_dir, ctx, config, wandb_log, wandb_project, wandb_run_name, s3_uri, s3_keep)
ddp_utils.barrier()  # out_dir exists before any rank goes on
if ctx.master:
    print(f"rho1: {model.num_params() / 1e6:.2f}M params ({sum(p.numel() for p in params) / 1e6:.2f}M trainable), "
          f"{n} heads, k_percent={k_percent}, reference {ref_init_from}, {len(datasets['train'])} train rows, "
          f"{max_iters} iters, {ctx.world_size} rank(s) on {ctx.device}")


def save_all_ranks(names, optimizer=optimizer):
    """The run checkpoint to out_dir/names (every rank calls this), then wait for it on every rank."""
    tc.save_run_all_ranks(model, optimizer, state, config, meta, "rho1", ctx, out_dir, names, uploader)
    ddp_utils.barrier()


@torch.no_grad()
def reference_ce(batch):
    """ce_reference (B, L, n) of this batch: from the cache when every row is in it, else one
    reference forward (one head's logits at a time), whose rows are then cached."""
    rows, lengths = batch["index"].tolist(), batch["lengths"].tolist()
    if ref_cache and all(r in cache for r in rows):
        out = torch.zeros(*batch["input_ids"].shape, n)
        for b, r in enumerate(rows):
            out[b, : lengths[b]] = cache[r]
        return out.to(ctx.device, non_blocking=True)
    with autocast:
        ce = ref_model.head_cross_entropies(batch["input_ids"].to(ctx.device), ce_chunk_size)  # (B, L, n)
    if ref_cache:
        ce_cpu = ce.float().cpu()
        for b, r in enumerate(rows):
            cache[r] = ce_cpu[b, : lengths[b]].clone()
    return ce.float()


@torch.no_grad()
def step_selection(micro_batches, ref_ces):
    """selection_scope='step': every micro-batch's 0/1 weights (B, L, n) from one no-grad pass of the
    policy, the top k_percent of each head's targets taken over the whole step on every rank (rows
    padded to max_length and gathered: the same selection as one process with all the rows)."""
    tokens = [b["input_ids"].to(ctx.device) for b in micro_batches]
    with autocast:
        excess = tc.cat_padded([model.head_cross_entropies(t, ce_chunk_size) - r for t, r in zip(tokens, ref_ces)],
                               max_length)  # (rows of this rank's step, max_length, n)
    targets = tc.cat_padded([shift_to_heads(b["loss_mask"].to(ctx.device), n) for b in micro_batches], max_length)
    w = compute_mtp_selective_weights(ddp_utils.all_gather(excess), ddp_utils.all_gather(targets), k_percent)
    return tc.split_padded(w[ctx.rank * len(excess):(ctx.rank + 1) * len(excess)], tokens)  # this rank's rows


if eval_only:
    tc.report(logger, ctx, {"iter": state["iter"], **evaluate_all_ranks(model, val_loader, ctx, autocast)})
    raise SystemExit(tc.finish_run(logger, uploader, ctx))  # 0, or 3: checkpoints missing on S3

# -----------------------------------------------------------------------------
# training loop
train_sampler.set_epoch(state["epoch"])  # this epoch's shuffle (the same on every rank) ...
train_sampler.set_skip(state["sampler_pos"])  # ... minus what a resumed run already read of it
train_iter = iter(train_loader)
model.train()
log_loss = torch.zeros(2, n, device=ctx.device)  # per-head loss, selected fraction; summed over steps
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
    # normalisers over the whole step, all micro-batches and ranks (one small all-reduce): each head's
    # targets, and how many of them its selection keeps (ceil(k_percent * n) per population: known from
    # the masks); / world_size because sync_gradients averages the ranks' gradients
    n_valid = torch.stack([shift_to_heads(b["loss_mask"], n).sum(dim=(0, 1)) for b in micro_batches])  # (M, n)
    counts = ddp_utils.all_reduce_sum(torch.cat([n_valid.sum(0), n_selected(n_valid, k_percent).sum(0)]).to(ctx.device))
    n_keep = n_selected(counts[:n], k_percent) if selection_scope == "step" else counts[n:]  # heads >= 1
    n_keep[0] = counts[0]  # head 0 keeps every target
    n_norm = n_keep.clamp(min=1) / ctx.world_size  # (n,)
    ref_ces = [reference_ce(b) for b in micro_batches]  # (B, L, n) each
    one_batch = len(micro_batches) == 1 and ctx.world_size == 1  # then the step is the micro-batch
    selected = step_selection(micro_batches, ref_ces) if selection_scope == "step" and not one_batch else None

    for i, batch in enumerate(micro_batches):
        tokens = batch["input_ids"].to(ctx.device, non_blocking=True)  # (B, L)
        targets = shift_to_heads(batch["loss_mask"].to(ctx.device, non_blocking=True), n)  # (B, L, n) 0/1

        def head_loss(k, ce_k):  # head 0: every target; head k >= 1: the top k_percent by excess loss
            if k == 0:
                w_k = targets[..., 0]
            elif selected is not None:  # chosen over the whole step (step_selection)
                w_k = selected[i][..., k]
            else:  # chosen in this micro-batch, from this head's own CE
                w_k = select_top_k(ce_k.detach() - ref_ces[i][..., k], targets[..., k], k_percent)
            return (w_k * ce_k).sum() / n_norm[k]

        with autocast:
            log_loss[0] += model.forward_backward(tokens, head_loss, naive=naive_backward, ce_chunk_size=ce_chunk_size)
        log_tokens += int(batch["lengths"].sum())
    log_loss[1] += n_keep / counts[:n].clamp(min=1)  # the fraction each head trained on (all ranks)
    ddp_utils.sync_gradients(params)
    grad_norm, stepped = ddp_utils.optimizer_step(optimizer, params, grad_clip)
    state["iter"] += 1  # counts attempted steps, so a checkpoint's iter matches its data position
    log_steps += 1
    if tc.too_many_bad_steps(stepped, state, max_bad_steps, out_dir, logger, ctx):
        save_all_ranks(("ckpt.pt",))
        raise SystemExit(tc.finish_run(logger, uploader, ctx, code=1))

    if state["iter"] % log_interval == 0 or state["iter"] == max_iters:
        ddp_utils.all_reduce_sum(log_loss[0])  # each rank holds its share of every step's loss
        tokens_all = ddp_utils.all_reduce_sum(torch.tensor([float(log_tokens)], device=ctx.device)).item()
        tokens_per_s = tokens_all / (time.time() - t_log)
        head_loss_avg = (log_loss[0] / (log_steps * ctx.world_size)).tolist()  # mean over the steps logged
        tc.report(logger, ctx, {"iter": state["iter"], "epoch": state["epoch"], "train/loss": sum(head_loss_avg) / n,
                                "train/head_loss": head_loss_avg,
                                "rho1/selected_frac": (log_loss[1] / log_steps).tolist(),
                                "rho1/cached_rows": len(cache), "lr": lr, "grad_norm": grad_norm.item(),
                                "tokens_per_s": tokens_per_s, "mfu": tc.mfu(model, ctx, dtype, tokens_per_s, max_length),
                                "mem_gb": ddp_utils.memory_gb(ctx)})
        log_loss.zero_()
        log_steps, log_tokens, t_log = 0, 0, time.time()

    if state["iter"] % eval_interval == 0 or state["iter"] == max_iters:
        metrics = {"iter": state["iter"], **evaluate_all_ranks(model, val_loader, ctx, autocast)}
        improved = tc.update_best(metrics, state)
        tc.report(logger, ctx, metrics)
        save_all_ranks(("ckpt.pt", "best.pt") if improved else ("ckpt.pt",))
        t_log = time.time()

save_all_ranks(("final.pt",), optimizer=None)  # weights only
raise SystemExit(tc.finish_run(logger, uploader, ctx))  # 0, or 3: checkpoints missing on S3
