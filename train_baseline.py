"""
Stage 0 (baseline): uniform multi-token-prediction cross-entropy.

Every head k is trained on every completion token t+k+1 with weight 1; the loss is the mean
over a head's targets, averaged over the n heads. This is the reference every weighted stage
is compared against.

Single device (CPU, MPS, one GPU):
    python train_baseline.py config/arith_baseline.py
DDP on one machine:
    torchrun --standalone --nproc_per_node=4 train_baseline.py config/mtp7b_baseline.py
Several machines (the same line on each; README 'Several machines': data on each, out_dir or S3):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST0:29500 --rdzv_id=run1 \
        train_baseline.py config/mtp7b_baseline.py --s3_uri=s3://bucket/run1
FSDP2 (full fine-tuning beyond one GPU's memory; with --nnodes, out_dir on a shared mount):
    torchrun --standalone --nproc_per_node=8 train_baseline.py config/mtp7b_full_fsdp.py
"""

import math
import os
import time

import torch

import ddp_utils
import train_common as tc
from data.format import fail
from evaluation import evaluate_all_ranks
from model import ModelArgs
from weighting import shift_to_heads

# -----------------------------------------------------------------------------
# settings (override with a config file and --key=value)
# I/O
out_dir = "out/baseline"  # checkpoints (ckpt.pt, best.pt, final.pt) and metrics.jsonl go here
init_from = "scratch"  # 'scratch' | 'resume' | 's3://bucket/prefix' | Meta or HF dir | checkpoint file or run dir
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
# model (init_from='scratch' only; otherwise the checkpoint's, except n_future_tokens below)
dim = 128  # model width
n_layers = 5  # trunk + heads: layers[:-1] is the trunk, then n_future_tokens head blocks
n_heads = 4  # attention heads
n_kv_heads: int | None = None  # None: = n_heads
multiple_of = 32  # FFN hidden size rounded up to a multiple of this
ffn_dim_multiplier: float | None = None  # FFN hidden size multiplier (LLaMA-2's)
norm_eps = 1e-5  # RMSNorm epsilon
rope_theta = 10000.0  # RoPE base
n_future_tokens = 4  # heads; also given to a one-head init_from (an HF LLaMA): copies of its last block
max_seq_len = 256  # RoPE table covers 2 * max_seq_len positions
# training
trainable = "all"  # 'all' | 'heads' (trunk frozen)
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
pad_vocab_multiple = 64 if torch.cuda.is_available() else 1  # embedding/output rows padded for GPU matmuls;
#   padded ids are masked, export.py drops them; a resumed run keeps its checkpoint's layout
fsdp = False  # FSDP2: shard every transformer block over the ranks (torchrun only; README 'FSDP')
seed = 1337  # data order, initialisation, sampling (rank r uses seed + r)
wandb_log = False  # also log to wandb (WANDB_MODE=offline works)
wandb_project = "wmtp"  # wandb project
wandb_run_name = "baseline"  # wandb run name
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
tc.check_storage_all_ranks(out_dir, init_from, fsdp, ctx)  # several machines: out_dir where each needs it?
torch.manual_seed(seed + ctx.rank)
autocast = ddp_utils.autocast_context(ctx, dtype)

# data
meta, datasets, loaders = tc.build_data(data_dir, ctx, batch_size, max_length, overflow, seed, n_samples,
                                        balance_correct, correct_ratio)
train_loader, train_sampler = loaders["train"]
val_loader, _ = loaders["val"]

# model
model_args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=meta["vocab_size"],
                       multiple_of=multiple_of, ffn_dim_multiplier=ffn_dim_multiplier, norm_eps=norm_eps,
                       rope_theta=rope_theta, n_future_tokens=n_future_tokens, max_seq_len=max_seq_len)
model, resume = tc.init_model(init_from, ctx, meta, out_dir, value_head=False, pad_vocab_multiple=pad_vocab_multiple,
                              model_args=model_args, seed=seed, n_future_tokens=n_future_tokens, stage="baseline")
n = model.n_future_tokens
tc.set_trainable(model, trainable)
ddp_utils.place_model(model, ctx, dtype)  # fsdp: each block sharded over the ranks, the rest replicated
params = [p for p in model.parameters() if p.requires_grad]  # after place_model: fsdp swaps in shards
ddp_utils.broadcast_parameters(model)  # identical start on every rank
tc.maybe_compile(model, compile)
optimizer = model.configure_optimizer(weight_decay, learning_rate, (beta1, beta2), ctx.device_type)
state = tc.restore_state(resume, optimizer, ctx, model)  # iter, epoch, sampler_pos, best_val_loss
if max_iters is None:
    max_iters = n_epochs * math.ceil(len(train_loader) / gradient_accumulation_steps)
config.update(max_iters=max_iters, lr_decay_iters=lr_decay_iters or max_iters)  # the derived values too
logger, uploader = tc.start_run(out_dir, ctx, config, wandb_log, wandb_project, wandb_run_name, s3_uri, s3_keep)
ddp_utils.barrier()  # out_dir exists before any rank goes on
if ctx.master:
    print(f"baseline: {model.num_params() / 1e6:.2f}M params ({sum(p.numel() for p in params) / 1e6:.2f}M trainable), "
          f"{n} heads, {len(datasets['train'])} train rows, {max_iters} iters, {ctx.world_size} rank(s) on {ctx.device}")


def save_all_ranks(names, optimizer=optimizer):
    """The run checkpoint to out_dir/names (all ranks call this), then wait for it on every rank."""
    tc.save_run_all_ranks(model, optimizer, state, config, meta, "baseline", ctx, out_dir, names, uploader)
    ddp_utils.barrier()


if eval_only:
    tc.report(logger, ctx, {"iter": state["iter"], **evaluate_all_ranks(model, val_loader, ctx, autocast)})
    raise SystemExit(tc.finish_run(logger, uploader, ctx))  # 0, or 3: checkpoints missing on S3

# -----------------------------------------------------------------------------
# training loop
train_sampler.set_epoch(state["epoch"])  # this epoch's shuffle (the same on every rank) ...
train_sampler.set_skip(state["sampler_pos"])  # ... minus what a resumed run already read of it
train_iter = iter(train_loader)
model.train()
log_loss = torch.zeros(n, device=ctx.device)  # per-head loss summed over the steps since the last log
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
    # each head's normaliser: its targets in the whole step, all micro-batches and ranks (one small
    # all-reduce), so the gradient is the same however the rows are split; / world_size because
    # sync_gradients averages the ranks' gradients
    n_targets = sum(shift_to_heads(b["loss_mask"], n).sum(dim=(0, 1)) for b in micro_batches).to(ctx.device)  # (n,)
    n_targets = ddp_utils.all_reduce_sum(n_targets).clamp(min=1) / ctx.world_size

    # forward + backward of every micro-step; gradients stay local until sync_gradients
    for batch in micro_batches:
        tokens = batch["input_ids"].to(ctx.device, non_blocking=True)  # (B, L)
        targets = shift_to_heads(batch["loss_mask"].to(ctx.device, non_blocking=True), n)  # (B, L, n) 0/1

        def head_loss(k, ce_k):  # uniform MTP CE: head k's CE summed over its targets (B, L) / the step's count
            return (targets[..., k] * ce_k).sum() / n_targets[k]

        with autocast:
            log_loss += model.forward_backward(tokens, head_loss, naive=naive_backward, ce_chunk_size=ce_chunk_size)
        log_tokens += int(batch["lengths"].sum())
    ddp_utils.sync_gradients(params)  # average over ranks, once per optimizer step (fsdp: the replicated rest)
    grad_norm, stepped = ddp_utils.optimizer_step(optimizer, params, grad_clip)
    state["iter"] += 1  # counts attempted steps, so a checkpoint's iter matches its data position
    log_steps += 1
    if tc.too_many_bad_steps(stepped, state, max_bad_steps, out_dir, logger, ctx):
        save_all_ranks(("ckpt.pt",))
        raise SystemExit(tc.finish_run(logger, uploader, ctx, code=1))

    if state["iter"] % log_interval == 0 or state["iter"] == max_iters:
        ddp_utils.all_reduce_sum(log_loss)  # each rank holds its share of every step's loss
        tokens_all = ddp_utils.all_reduce_sum(torch.tensor([float(log_tokens)], device=ctx.device)).item()
        tokens_per_s = tokens_all / (time.time() - t_log)
        head_loss_avg = (log_loss / (log_steps * ctx.world_size)).tolist()  # mean over the steps logged
        tc.report(logger, ctx, {"iter": state["iter"], "epoch": state["epoch"], "train/loss": sum(head_loss_avg) / n,
                                "train/head_loss": head_loss_avg, "lr": lr, "grad_norm": grad_norm.item(),
                                "tokens_per_s": tokens_per_s, "mfu": tc.mfu(model, ctx, dtype, tokens_per_s, max_length),
                                "mem_gb": ddp_utils.memory_gb(ctx)})
        log_loss.zero_()
        log_steps, log_tokens, t_log = 0, 0, time.time()

    if state["iter"] % eval_interval == 0 or state["iter"] == max_iters:
        metrics = {"iter": state["iter"], **evaluate_all_ranks(model, val_loader, ctx, autocast)}
        improved = tc.update_best(metrics, state)
        tc.report(logger, ctx, metrics)
        save_all_ranks(("ckpt.pt", "best.pt") if improved else ("ckpt.pt",))
        t_log = time.time()  # evaluation time is not training throughput

save_all_ranks(("final.pt",), optimizer=None)  # weights only
raise SystemExit(tc.finish_run(logger, uploader, ctx))  # 0, or 3: checkpoints missing on S3
