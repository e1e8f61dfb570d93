"""
The pieces all four train_*.py scripts share, so each lives once: data set-up, model
initialisation (`init_from`), which parameters train, the optimizer and its schedule, the epoch
stream with its resume position, and the run checkpoint (what goes in it, where it is written,
its S3 upload). Each script's training loop, losses and evaluation stay in the script.
"""

import dataclasses
import math
import os
import shutil
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist

import ddp_utils
from data.loader import TokenDataset, check_tokenizer, load_meta, make_loader
from model import ModelArgs, Tokenizer, Transformer

PTDTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXIT_S3_FAILED = 3  # the run finished and wrote its checkpoints to out_dir, but not all of them reached S3
MODEL_ARG_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "ffn_dim_multiplier", "norm_eps",
                  "rope_theta", "n_future_tokens", "max_seq_len")


def error_line(msg) -> str:
    """'train_x.py: error: msg' on one line."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "wmtp"
    return f"{prog}: error: {' '.join(str(msg).splitlines())}"


def fail(msg: str, code: int = 2):
    """A one-line error on stderr and a non-zero exit, before any work starts."""
    print(error_line(msg), file=sys.stderr, flush=True)
    sys.exit(code)


def check_config(cfg: dict, ctx):
    """Settings errors that must stop a run before any work: one line each, exit 2."""
    if not cfg["out_dir"].strip():
        fail("out_dir is empty: give the folder for checkpoints and metrics.jsonl, e.g. --out_dir=out/run1")
    if cfg["dtype"] not in PTDTYPE or cfg["dtype"] == "float16":
        fail(f"dtype {cfg['dtype']!r}: use 'float32' or 'bfloat16'")
    if cfg["dtype"] == "bfloat16" and ctx.device_type == "cuda" and not torch.cuda.is_bf16_supported():
        fail("dtype 'bfloat16' requested but this GPU does not support it; use --dtype=float32")
    if cfg["s3_uri"] is not None and not str(cfg["s3_uri"]).startswith("s3://"):
        fail(f"s3_uri {cfg['s3_uri']!r} is not of the form s3://bucket/prefix")
    if cfg["s3_uri"] is not None:
        from s3 import parse_s3_uri
        try:
            parse_s3_uri(cfg["s3_uri"])
        except ValueError as e:
            fail(f"s3_uri: {e}")
    for key in ("batch_size", "gradient_accumulation_steps", "eval_interval", "log_interval", "max_bad_steps",
                "s3_keep", "pad_vocab_multiple"):
        if key in cfg and cfg[key] < 1:
            fail(f"{key} must be >= 1, got {cfg[key]}")


def autocast_context(ctx, dtype: str):
    """bf16 autocast on CUDA/CPU/MPS when asked for; fp32 runs without autocast."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=ctx.device_type, dtype=PTDTYPE[dtype])


# -----------------------------------------------------------------------------
# data

def build_data(cfg: dict, ctx, splits=("train", "val")):
    """Datasets and loaders of the shared format: training sharded with padding (equal steps on
    every rank), validation sharded without padding (every sample counted exactly once)."""
    try:
        meta = load_meta(cfg["data_dir"])
        datasets = {s: TokenDataset(cfg["data_dir"], s, max_length=cfg["max_length"], overflow=cfg["overflow"],
                                    **(dict(n_samples=cfg["n_samples"], balance_correct=cfg["balance_correct"],
                                            correct_ratio=cfg["correct_ratio"], seed=cfg["seed"]) if s == "train" else {}))
                    for s in splits}
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    loaders = {}
    for s, ds in datasets.items():
        loaders[s] = make_loader(ds, cfg["batch_size"], meta["pad_id"], shuffle=(s == "train"), seed=cfg["seed"],
                                 rank=ctx.rank, world_size=ctx.world_size, pad=(s == "train"),
                                 pin_memory=ctx.device_type == "cuda")
        if ctx.master and (ds.n_truncated or ds.n_dropped):
            print(f"data {s}: {ds.n_truncated} rows truncated, {ds.n_dropped} dropped at max_length={cfg['max_length']}")
    return meta, datasets, loaders


def epoch_batches(loader, sampler, state: dict):
    """Endless stream of training batches. state['epoch'] and state['sampler_pos'] (samples of this
    rank's epoch order already consumed) advance as batches are handed out, so a checkpoint taken
    between two batches resumes at exactly the next one."""
    while True:
        sampler.set_epoch(state["epoch"])
        sampler.set_skip(state["sampler_pos"])
        for batch in loader:
            state["sampler_pos"] += len(batch["index"])
            yield batch
        state["epoch"] += 1
        state["sampler_pos"] = 0


# -----------------------------------------------------------------------------
# model

def init_model(cfg: dict, ctx, meta: dict, value_head):
    """The model named by init_from, on the CPU, and the checkpoint to resume from (or None).
    Loaded weights stay as stored, memory-mapped (place_model converts them one at a time).

    init_from: 'scratch' (the model settings, vocab from the data), 'resume' (out_dir/ckpt.pt, exact
    continuation), 's3://bucket/prefix' (the manifest's latest checkpoint, then as 'resume'), a Meta
    directory, or a checkpoint file / run directory of any stage (weights only, new run).
    value_head: True (add a fresh one if missing), False (drop), None (as in the checkpoint)."""
    init_from, resume = cfg["init_from"], None
    try:
        if init_from == "scratch":
            if "dim" not in cfg:
                fail("init_from='scratch' builds a new model only in train_baseline.py; give a model here")
            args = ModelArgs(vocab_size=meta["vocab_size"], **{k: cfg[k] for k in MODEL_ARG_KEYS})
            torch.manual_seed(cfg["seed"])
            model = Transformer(args, value_head=bool(value_head))
        elif init_from == "resume" or init_from.startswith("s3://"):
            path = os.path.join(cfg["out_dir"], "ckpt.pt")
            if init_from.startswith("s3://"):
                from s3 import download_checkpoint
                path = os.path.join(cfg["out_dir"], "s3_resume.pt")
                if ctx.local_master:  # one download per node; the other ranks wait for it
                    try:
                        downloaded = download_checkpoint(init_from, cfg["out_dir"])  # the manifest's latest
                    except RuntimeError as e:  # store unreachable, access denied, ...
                        fail(f"init_from={init_from!r}: {e}")
                    os.replace(downloaded, path)
                ddp_utils.barrier()
            resume = ddp_utils.load_checkpoint(path)
            if resume.get("dcp"):  # an FSDP run's optimizer state: a DCP folder beside ckpt.pt
                resume["dcp"] = os.path.join(os.path.dirname(os.path.abspath(path)), resume["dcp"])
            model = Transformer.from_checkpoint(resume, dtype=None, value_head=value_head, source=path)
        else:
            model = Transformer.load(init_from, device="cpu", dtype=None, value_head=value_head)
    except (FileNotFoundError, ValueError, KeyError) as e:
        fail(f"init_from={init_from!r}: {e}")
    if resume is None and model.args.pad_vocab_multiple != cfg["pad_vocab_multiple"]:
        model.pad_vocab(cfg["pad_vocab_multiple"])  # a resumed run keeps its layout (its optimizer state's shapes)
    if model.args.vocab_size != meta["vocab_size"]:
        fail(f"model vocab_size {model.args.vocab_size} does not match the data's tokenizer "
             f"({meta['vocab_size']} in {cfg['data_dir']}/meta.json)")
    if cfg.get("tokenizer_check", True) and os.path.isfile(meta.get("tokenizer", "")):
        try:
            check_tokenizer(meta, Tokenizer(meta["tokenizer"]))
        except ValueError as e:
            fail(e)
    return model, resume


def set_trainable(model, trainable: str) -> list:
    """Freeze everything but `trainable` and return the trainable parameters.
    'all': every weight (value head included if present); 'heads': the n head blocks plus the
    shared norm and output (the trunk and embeddings frozen, as in the 7B runs); 'value_head':
    the critic only; 'heads+value_head': both."""
    groups = {
        "all": lambda n: True,
        "heads": lambda n: n.startswith(("extra_heads.", "norm.", "output.", f"layers.{len(model.layers) - 1}.")),
        "value_head": lambda n: n.startswith("value_head."),
    }
    parts = trainable.split("+")
    if any(p not in groups for p in parts):
        fail(f"trainable={trainable!r}: use 'all', 'heads', 'value_head' or 'heads+value_head'")
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(any(groups[g](name) for g in parts))
        if p.requires_grad:
            params.append(p)
    return params


def place_model(model, ctx, dtype: str):
    """Move to the device, every weight in its training dtype: trainable ones fp32 (AdamW's master
    copy), frozen ones the compute dtype (a frozen bf16 trunk halves its memory), the value head
    fp32. One weight at a time, so a memory-mapped checkpoint is never copied whole on the host.
    fsdp: each block in turn is converted on the CPU and sharded over the ranks (each keeps
    1/world_size of it on its device: ddp_utils.fsdp_shard_blocks), then the replicated rest
    (embeddings, norm, output, value head) moves; no GPU ever holds the whole model."""
    def training_dtype(name, p):
        keep_fp32 = dtype == "float32" or p.requires_grad or name.startswith("value_head.")
        return torch.float32 if keep_fp32 else PTDTYPE[dtype]

    if ctx.fsdp:
        def convert_block(block):  # on the CPU, just before fully_shard moves its shards to the device
            for name, p in block.named_parameters():
                p.data = p.data.to(dtype=training_dtype(name, p))
        ddp_utils.fsdp_shard_blocks(model, ctx, param_dtype=None if dtype == "float32" else PTDTYPE[dtype],
                                    before_shard=convert_block)
    for name, p in model.named_parameters():
        if not ddp_utils.is_sharded(p):
            p.data = p.data.to(device=ctx.device, dtype=training_dtype(name, p))
    return model


def maybe_compile(model, enabled: bool):
    """torch.compile each transformer block (the loss code stays eager, it has Python control flow)."""
    if enabled:
        for block in [*model.layers, *model.extra_heads]:
            block.compile()
    return model


def configure_optimizer(params, cfg: dict, ctx):
    """AdamW; weight decay on matrices only (not norms, biases); fused kernel on CUDA."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]),
                             fused=ctx.device_type == "cuda")


def get_lr(it: int, cfg: dict, max_iters: int) -> float:
    """Linear warm-up, then cosine decay to min_lr at lr_decay_iters (default: max_iters)."""
    warmup, decay_iters = cfg["warmup_iters"], cfg["lr_decay_iters"] or max_iters
    if it < warmup:
        return cfg["learning_rate"] * (it + 1) / (warmup + 1)
    if it >= decay_iters:
        return cfg["min_lr"]
    ratio = (it - warmup) / max(1, decay_iters - warmup)
    return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg["learning_rate"] - cfg["min_lr"])


def restore_state(resume: dict, optimizer, ctx, model=None) -> dict:
    """Optimizer, position and RNG state of a resumed run (this rank's RNG if it was saved).
    Either layout resumes in either mode: a whole optimizer state (DDP or single-process ckpt.pt)
    is sharded for an FSDP run; an FSDP run's DCP folder (model + optimizer) loads into an FSDP,
    DDP or single-process run. `model` is needed for both (parameter names, DCP layout)."""
    if resume is None:
        return {"iter": 0, "epoch": 0, "sampler_pos": 0, "best_val_loss": float("inf")}
    if resume.get("optimizer") is not None:
        if ctx.fsdp:
            try:
                ddp_utils.load_full_optimizer_state(model, optimizer, resume["optimizer"])
            except ValueError as e:
                fail(f"resume: {e}")
        else:
            optimizer.load_state_dict(resume["optimizer"])
    elif resume.get("dcp"):
        if os.path.isdir(resume["dcp"]):
            ddp_utils.load_dcp(resume["dcp"], model, optimizer)
        elif ctx.master:
            print(f"resume: {resume['dcp']} (this FSDP checkpoint's optimizer state) is not here; "
                  "weights resumed, AdamW moments start from zero")
    rngs = resume.get("rng") or []
    if len(rngs) == ctx.world_size:
        ddp_utils.set_rng_state(rngs[ctx.rank])
    elif ctx.master:
        print(f"resume: checkpoint has RNG states of {len(rngs)} ranks, this run has {ctx.world_size}; "
              "RNG not restored (data order still resumes exactly)")
    return {"iter": resume["iter"], "epoch": resume["epoch"], "sampler_pos": resume["sampler_pos"],
            "best_val_loss": resume.get("best_val_loss", float("inf"))}


# -----------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def eval_sums(model, batches, device, autocast, heads: bool = True, value: bool = False):
    """Validation sums of this process over `batches` (shared by evaluate and eval.py): per head
    (ce_sum, n_targets, n_top1_correct) as (3, n) over completion targets; the value head's squared
    error sum and count over the value positions (2,); and V at each row's last token with the
    row's label (CPU vectors, for accuracy and AUC). Sums, not means: ranks and batches combine exactly."""
    from weighting import head_targets_mask, value_mask
    n, device = model.n_future_tokens, torch.device(device)
    acc = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    sums = torch.zeros(3, n, dtype=acc, device=device)  # ce_sum, count, correct per head
    vsums = torch.zeros(2, dtype=acc, device=device)  # squared error sum, count
    last_values, labels = [], []
    for batch in batches:
        tokens = batch["input_ids"].to(device)
        loss_mask = batch["loss_mask"].to(device)
        with autocast:
            h = model.trunk_forward(tokens)  # (B, L, dim)
            if heads:
                sums += torch.stack(model.head_eval_sums(tokens, head_targets_mask(loss_mask, n), h_trunk=h))
        if value:
            v = model.value(h)  # (B, L) fp32
            reward = batch["reward"].to(device)
            vm = value_mask(loss_mask).to(acc)
            vsums += torch.stack([(vm * (v.to(acc) - reward.to(acc)[:, None]) ** 2).sum(), vm.sum()])
            last = (batch["lengths"] - 1).to(device)  # (B,) the last completion token (eos unless truncated)
            last_values.append(v.gather(1, last[:, None]).squeeze(1).cpu())
            labels.append(batch["reward"])
    scores = torch.cat(last_values) if last_values else torch.zeros(0)
    ys = torch.cat(labels) if labels else torch.zeros(0)
    return sums, vsums, scores, ys


@torch.no_grad()
def evaluate(model, loader, ctx, autocast, heads: bool = True, value: bool = False) -> dict:
    """Validation metrics, exact over ranks: every rank sums over its shard (eval_sums), the sums
    are all-reduced, then divided (never a mean of per-rank means).
    heads: per-head CE and top-1 accuracy over completion targets; val/loss = their mean over heads.
    value: value MSE over the value positions, and accuracy/AUC of V at the last token vs the label."""
    from weighting import auc, binary_accuracy
    model.eval()
    n = model.n_future_tokens
    sums, vsums, scores, ys = eval_sums(model, loader, ctx.device, autocast, heads, value)
    metrics = {}
    if heads:
        ddp_utils.all_reduce_sum(sums)
        head_loss = (sums[0] / sums[1].clamp(min=1)).tolist()
        metrics.update({"val/loss": sum(head_loss) / n, "val/head_loss": head_loss,
                        "val/head_acc": (sums[2] / sums[1].clamp(min=1)).tolist()})
    if value:
        ddp_utils.all_reduce_sum(vsums)
        if ctx.ddp:  # AUC needs every sample: gather the (small) per-sample vectors
            gathered = [None] * ctx.world_size
            dist.all_gather_object(gathered, (scores, ys))
            scores, ys = torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered])
        metrics.update({"val/value_mse": (vsums[0] / vsums[1].clamp(min=1)).item(),
                        "val/value_acc": binary_accuracy(scores, ys), "val/value_auc": auc(scores, ys)})
        if not heads:
            metrics["val/loss"] = metrics["val/value_mse"]
    model.train()
    return metrics


# -----------------------------------------------------------------------------
# checkpoints

def save_run(model, optimizer, state: dict, cfg: dict, meta: dict, stage: str, ctx, names=("ckpt.pt",),
             uploader=None):
    """Write the run checkpoint (all ranks call this: it gathers every rank's RNG state) to each
    of `names` in out_dir on rank 0, atomically, then barrier. With an uploader, rank 0 queues
    each file for S3 under a per-iteration name: ckpt.pt as ckpt_{iter:07d}.pt, which the manifest
    marks best when best.pt is written with it (one upload: the two files are the same checkpoint)
    and names `latest` (what init_from='s3://...' resumes from); final.pt as final_{iter:07d}.pt
    (weights only, so never `latest`). `names` is usually ("ckpt.pt", "best.pt") after an
    improved validation, ("ckpt.pt",) otherwise, ("final.pt",) at the end."""
    rng = ddp_utils.get_rng_state()
    rngs = [None] * ctx.world_size
    if ctx.ddp:
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    dcp_dir = None
    if ctx.fsdp:  # the whole model gathered on rank 0 (same file format); optimizer state sharded (DCP)
        model_sd = ddp_utils.fsdp_full_state_dict(model)
        if optimizer is not None:
            dcp_dir = save_dcp_state(model, optimizer, state, cfg, ctx)
    if ctx.master:
        ckpt = {
            "model": ddp_utils.clean_state_dict(model_sd if ctx.fsdp else ddp_utils.unwrap(model).state_dict()),
            "model_args": dataclasses.asdict(ddp_utils.unwrap(model).args),
            "stage": stage,
            "optimizer": optimizer.state_dict() if optimizer is not None and not ctx.fsdp else None,
            "dcp": dcp_dir,  # fsdp: model + optimizer state in this folder of out_dir (what resume reads)
            "iter": state["iter"], "epoch": state["epoch"], "sampler_pos": state["sampler_pos"],
            "rng": rngs, "best_val_loss": state["best_val_loss"], "config": cfg,
            "data": {"dir": cfg["data_dir"], "vocab_size": meta["vocab_size"], "tokenizer": meta.get("tokenizer")},
        }
        for name in names:
            path = ddp_utils.save_checkpoint(os.path.join(cfg["out_dir"], name), ckpt)
            if uploader is None or (name == "best.pt" and "ckpt.pt" in names):
                continue
            uploader.submit(path, f"{name.split('.')[0]}_{state['iter']:07d}.pt", iter_num=state["iter"],
                            is_best=name == "best.pt" or (name == "ckpt.pt" and "best.pt" in names),
                            latest=name == "ckpt.pt")
        if dcp_dir is not None:  # ckpt.pt now names the new folder: the older ones can go
            root = os.path.join(cfg["out_dir"], "ckpt_dcp")
            for d in os.listdir(root):
                if os.path.join("ckpt_dcp", d) != dcp_dir:
                    shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    ddp_utils.barrier()


def save_dcp_state(model, optimizer, state: dict, cfg: dict, ctx) -> str:
    """fsdp: model and optimizer as a distributed checkpoint (every rank writes its own shards) in a
    new folder out_dir/ckpt_dcp/<iter>; returns that folder relative to out_dir, for ckpt.pt to name.
    The previous folder is removed only after the new ckpt.pt is written (save_run), so a crash
    mid-save leaves the previous ckpt.pt and its folder intact. out_dir must be storage that every
    node sees (the same as for resuming any multi-node run from out_dir)."""
    name = [None]
    if ctx.master:
        base = name[0] = os.path.join("ckpt_dcp", f"{state['iter']:07d}")
        k = 1
        while os.path.exists(os.path.join(cfg["out_dir"], name[0])):  # same iter saved twice: never overwrite
            name[0], k = f"{base}.{k}", k + 1
    dist.broadcast_object_list(name, src=0)
    ddp_utils.save_dcp(os.path.join(cfg["out_dir"], name[0]), model, optimizer)
    return name[0]


def optimizer_step(optimizer, params, grad_clip: float):
    """Clip the (already synced) gradients and step, unless their norm is non-finite: then the step
    is skipped, the same way on every rank. One host sync per optimizer step (not per micro-step)."""
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    if any(ddp_utils.is_sharded(p) for p in params):  # fsdp: sharded block grads + replicated rest
        grad_norm = ddp_utils.clip_grad_norm_(params, max_norm)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    stepped = bool(torch.isfinite(grad_norm))
    if stepped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, stepped


def too_many_bad_steps(stepped: bool, state: dict, cfg: dict, logger, ctx) -> bool:
    """Count consecutive skipped steps; True once max_bad_steps is reached (the caller then saves
    the last good state, which the skipped steps never changed, and stops)."""
    if stepped:
        state["bad_steps"] = 0
        return False
    state["bad_steps"] = state.get("bad_steps", 0) + 1
    report(logger, ctx, {"iter": state["iter"], "train/skipped_step": 1, "train/bad_steps": state["bad_steps"]},
           prefix="non-finite loss or gradient norm, step skipped: ")
    if state["bad_steps"] >= cfg["max_bad_steps"]:
        if ctx.master:
            print(error_line(f"{state['bad_steps']} non-finite steps in a row (max_bad_steps={cfg['max_bad_steps']}): "
                             f"stopping; the last good state goes to {cfg['out_dir']}/ckpt.pt"),
                  file=sys.stderr, flush=True)
        return True
    return False


def report(logger, ctx, metrics: dict, prefix: str = ""):
    """Rank 0 prints one line and appends it to metrics.jsonl (and wandb)."""
    if ctx.master:
        print(prefix + ddp_utils.format_metrics(metrics), flush=True)
        logger.log(metrics)


def update_best(metrics: dict, state: dict) -> bool:
    """Track the best validation loss; never overwritten by a worse value."""
    improved = metrics["val/loss"] < state["best_val_loss"]
    if improved:
        state["best_val_loss"] = metrics["val/loss"]
    metrics["val/best_loss"] = state["best_val_loss"]
    return improved


def start_run(cfg: dict, ctx):
    """Rank 0 creates out_dir, clears temp files a killed save left behind, opens the metrics log
    and, with s3_uri, the background uploader."""
    logger = uploader = None
    if ctx.master:
        os.makedirs(cfg["out_dir"], exist_ok=True)
        ddp_utils.remove_stale_temp_files(cfg["out_dir"])
        logger = ddp_utils.MetricsLogger(cfg["out_dir"], cfg["wandb_log"], cfg["wandb_project"],
                                         cfg["wandb_run_name"], cfg)
        if cfg["s3_uri"]:
            from s3 import S3Uploader
            uploader = S3Uploader(cfg["s3_uri"], keep=cfg["s3_keep"])
    ddp_utils.barrier()
    return logger, uploader


def finish_run(logger, uploader, ctx) -> int:
    """Wait for pending S3 uploads, close the log, leave the process group. Returns the exit code:
    0, or EXIT_S3_FAILED on rank 0 when checkpoints did not reach S3 (they are all in out_dir)."""
    code = 0
    if uploader is not None:
        not_uploaded = uploader.close(timeout=600)  # waits for pending uploads; prints what did not reach S3
        if not_uploaded:
            print(error_line(f"{len(not_uploaded)} checkpoint(s) did not reach {uploader.uri}; they are in out_dir "
                             f"(exit code {EXIT_S3_FAILED})"), file=sys.stderr, flush=True)
            code = EXIT_S3_FAILED
    if logger is not None:
        logger.finish()
    ddp_utils.cleanup()
    return code


def mfu(model, ctx, dtype: str, tokens_per_s: float, seq_len: float):
    """Model FLOPs utilisation against the GPU's dense peak (None on CPU/MPS or an unknown GPU);
    every head's FLOPs counted (model.flops_per_token), attention at seq_len = max_length (an
    upper bound for shorter rows)."""
    if ctx.device_type != "cuda":
        return None
    peak = ddp_utils.peak_flops(torch.cuda.get_device_name(), dtype, torch.backends.cuda.matmul.allow_tf32)
    if not peak:
        return None
    from model import flops_per_token
    m = ddp_utils.unwrap(model)
    blocks = [*m.layers, *m.extra_heads]
    n_trainable = sum(any(p.requires_grad for p in b.parameters()) for b in blocks)
    any_head_trains = m.output.weight.requires_grad or n_trainable > 0
    fpt = flops_per_token(m.args, int(seq_len), n_trainable, m.n_future_tokens if any_head_trains else 0)
    return fpt * tokens_per_s / (peak * ctx.world_size)


def memory_gb(ctx) -> float:
    if ctx.device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB -> GB
