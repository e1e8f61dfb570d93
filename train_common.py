"""
The set-up pieces all four train_*.py scripts share, so each lives once: checking the settings,
the data and its loaders, the model named by init_from, the learning-rate schedule, resume state,
the run checkpoint (what goes in it, where it is written, its S3 upload) and the log line.
Each takes the settings it needs as arguments. The training loop, the loss, the collectives
of a step and the evaluation calls stay in the scripts.
"""

import dataclasses
import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ddp_utils
from data.format import error_line, fail
from data.loader import TokenDataset, check_tokenizer, load_meta, make_loader
from model import Transformer, flops_per_token
from tokenizer import Tokenizer

EXIT_S3_FAILED = 3  # the run finished and wrote its checkpoints to out_dir, but not all of them reached S3


def check_config(config: dict, ctx):
    """Settings errors that must stop a run before any work: one line each, exit 2. Reads only the
    keys named here (those the four scripts share)."""
    if not str(config["out_dir"]).strip():
        fail("out_dir is empty: give the folder for checkpoints and metrics.jsonl, e.g. --out_dir=out/run1")
    dtype = config["dtype"]
    if dtype not in ("float32", "bfloat16"):
        fail(f"dtype {dtype!r}: use 'float32' or 'bfloat16'")
    if dtype == "bfloat16" and ctx.device_type == "cuda" and not torch.cuda.is_bf16_supported():
        fail("dtype 'bfloat16' requested but this GPU does not support it; use --dtype=float32")
    if config["s3_uri"] is not None:
        from s3 import parse_s3_uri
        try:
            parse_s3_uri(config["s3_uri"])
        except ValueError as e:
            fail(f"s3_uri: {e}")
    for key in ("batch_size", "gradient_accumulation_steps", "eval_interval", "log_interval", "max_bad_steps",
                "s3_keep", "pad_vocab_multiple"):
        if key in config and config[key] < 1:
            fail(f"{key} must be >= 1, got {config[key]}")


def check_storage_all_ranks(out_dir, init_from, fsdp: bool, ctx):
    """On several machines (torchrun --nnodes=2 or more), refuse before any work what needs a file
    that one machine writes and another reads, with one line saying what to mount: fsdp=True (every
    rank writes its shards of the optimizer state into out_dir/ckpt_dcp/<iter>, and a resume reads
    all of them) needs out_dir to be one folder that every machine mounts; init_from='resume' needs
    out_dir/ckpt.pt on every machine. Plain DDP needs neither: rank 0 alone writes, and
    init_from='s3://...' downloads on each machine. Rank 0 leaves a file in its out_dir and each
    machine looks for it in its own. A collective; nothing to check on one machine."""
    if ctx.nodes == 1 or not (fsdp or init_from == "resume"):
        return
    probe, created = [None, out_dir], False  # (a file name, rank 0's out_dir)
    if ctx.master:
        created = not os.path.isdir(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        probe[0] = f".shared_check.tmp.{os.getpid()}.{time.time_ns()}"  # a .tmp. name: start_run clears a leftover
        open(os.path.join(out_dir, probe[0]), "w").close()
    dist.broadcast_object_list(probe, src=0)
    missing = torch.zeros(2)  # (machines that do not see rank 0's out_dir, machines without out_dir/ckpt.pt)
    if ctx.local_master:
        deadline = time.monotonic() + 2.0  # a network filesystem may show a new file to other machines late
        while not os.path.isfile(os.path.join(out_dir, probe[0])) and time.monotonic() < deadline:
            time.sleep(0.1)
        missing[0] = not os.path.isfile(os.path.join(out_dir, probe[0]))
        missing[1] = not os.path.isfile(os.path.join(out_dir, "ckpt.pt"))
    not_shared, no_ckpt = (int(x) for x in ddp_utils.all_reduce_sum(missing).tolist())
    if ctx.master:
        os.remove(os.path.join(out_dir, probe[0]))
        if created and (not_shared or no_ckpt):
            os.rmdir(out_dir)  # refused: leave nothing behind
    problems = []
    if fsdp and not_shared:
        problems.append(f"fsdp=True writes every rank's shards of the optimizer state to out_dir/ckpt_dcp/, but "
                        f"{not_shared} machine(s) do not see rank 0's out_dir {probe[1]}")
    if init_from == "resume" and no_ckpt:
        problems.append(f"init_from='resume' reads out_dir/ckpt.pt on every machine, but {no_ckpt} machine(s) have none")
    if problems:
        remedy = "give as out_dir a folder on storage that every machine mounts at the same path (NFS, Lustre, ...)"
        if not (fsdp and not_shared):
            remedy += ", or resume from the run's s3_uri with init_from=s3://..."
        exit_all_ranks(f"on {ctx.nodes} machines: {'; '.join(problems)}: {remedy}", ctx)


def exit_all_ranks(error, ctx):
    """Every rank stops (exit 2) with `error` printed once per machine, once all of them know (after
    a collective): the process group is left first, as exiting inside it can abort (SIGABRT) while
    a gloo thread is still busy. `error` None: a rank of a machine that already said why."""
    ddp_utils.cleanup()
    if error and ctx.local_master:
        fail(error)
    sys.exit(2)


# -----------------------------------------------------------------------------
# data

def build_data(data_dir, ctx, batch_size, max_length, overflow, seed, n_samples=None, balance_correct=False,
               correct_ratio=0.5):
    """meta.json, the train and val datasets and their (loader, sampler) pairs for this rank:
    training sharded with padding (equal steps on every rank, DistributedSampler's repeats),
    validation sharded without padding (every sample counted exactly once). The sampling options
    apply to the training split only."""
    try:
        meta = load_meta(data_dir)
        datasets = {"train": TokenDataset(data_dir, "train", n_samples=n_samples, balance_correct=balance_correct,
                                          correct_ratio=correct_ratio, seed=seed, max_length=max_length,
                                          overflow=overflow),
                    "val": TokenDataset(data_dir, "val", max_length=max_length, overflow=overflow)}
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    loaders = {}
    for split, ds in datasets.items():
        loaders[split] = make_loader(ds, batch_size, meta["pad_id"], shuffle=split == "train", seed=seed,
                                     rank=ctx.rank, world_size=ctx.world_size, pad=split == "train",
                                     pin_memory=ctx.device_type == "cuda")
        if ctx.master and (ds.n_truncated or ds.n_dropped):
            print(f"data {split}: {ds.n_truncated} rows truncated, {ds.n_dropped} dropped at max_length={max_length}")
    return meta, datasets, loaders


# -----------------------------------------------------------------------------
# model

S3_INIT = "s3_init.pt"  # what init_from='s3://...' downloads into out_dir, on every machine


def init_model(init_from, ctx, meta: dict, out_dir, value_head, pad_vocab_multiple: int, model_args=None, seed=0,
               n_future_tokens=None, stage=None):
    """The model named by init_from, on the CPU, and the checkpoint to resume from (or None).
    Loaded weights stay as stored, memory-mapped (ddp_utils.place_model converts them one at a time).

    init_from: 'scratch' (a new model of `model_args`, a ModelArgs, initialised from `seed`: only the
    scripts that can build one pass it), 'resume' (out_dir/ckpt.pt, exact continuation),
    's3://bucket/prefix' (the manifest's latest checkpoint, downloaded to out_dir/s3_init.pt on each
    machine: a checkpoint of this script's `stage` ('baseline', 'critic', ...) resumes as 'resume'
    does, another stage's starts a new run from its weights), a Meta directory, a Hugging Face LLaMA
    directory, or a checkpoint file / run directory of any stage (weights only, new run).
    n_future_tokens (train_baseline.py passes its setting): a plain next-token source (one head: any
    Hugging Face LLaMA, a LLaMA-2 Meta directory) gets that many heads, head 0 its own last block and
    heads 1.. copies of it; an MTP source keeps its heads.
    value_head: True (add a fresh one if missing), False (drop), None (as in the checkpoint)."""
    resume = None
    from_s3 = init_from.startswith("s3://")
    source = fetch_s3_all_ranks(init_from, ctx, out_dir) if from_s3 else init_from  # a local file on every machine
    try:
        if init_from == "scratch":
            if model_args is None:
                fail("init_from='scratch' builds a new model only in train_baseline.py; give a model here")
            torch.manual_seed(seed)  # the same initial weights on every rank
            model = Transformer(model_args, value_head=bool(value_head))
        elif init_from == "resume" or from_s3:
            path = os.path.join(out_dir, "ckpt.pt") if init_from == "resume" else source
            ckpt = ddp_utils.load_checkpoint(path)  # memory-mapped, read once
            if init_from == "resume" or ckpt.get("stage") == stage:  # an exact continuation
                resume = ckpt
                if resume.get("dcp"):  # an FSDP run's optimizer state: a DCP folder beside ckpt.pt
                    resume["dcp"] = os.path.join(os.path.dirname(os.path.abspath(path)), resume["dcp"])
            model = Transformer.from_checkpoint(ckpt, dtype=None, value_head=value_head, source=path)
        else:
            model = Transformer.load(source, device="cpu", dtype=None, value_head=value_head)
        if resume is None and model.n_future_tokens == 1 and (n_future_tokens or 1) > 1:
            model.set_n_future_tokens(n_future_tokens)  # a plain LLaMA gets heads: copies of its last block
    except (FileNotFoundError, ValueError, KeyError) as e:
        fail(f"init_from={init_from!r}: {e}")
    if resume is None and model.args.pad_vocab_multiple != pad_vocab_multiple:
        model.pad_vocab(pad_vocab_multiple)  # a resumed run keeps its layout (its optimizer state's shapes)
    if model.args.vocab_size != meta["vocab_size"]:
        fail(f"model vocab_size {model.args.vocab_size} does not match the data's tokenizer "
             f"({meta['vocab_size']} in {meta['data_dir']}/meta.json)")
    if os.path.isfile(meta.get("tokenizer", "")):
        try:
            check_tokenizer(meta, Tokenizer(meta["tokenizer"]))
        except ValueError as e:
            fail(e)
    return model, resume


def fetch_s3_all_ranks(uri, ctx, out_dir) -> str:
    """Download the manifest's latest checkpoint under `uri` to out_dir/s3_init.pt once per machine
    (its local rank 0; every machine has its own disk, or they share one and the downloads are
    atomic) and return that path once every machine has it. A failed download stops every rank
    (exit 2), with its one line on the machine where it failed. A collective."""
    error = None
    if ctx.local_master:
        from s3 import download_checkpoint
        try:
            download_checkpoint(uri, out_dir, filename=S3_INIT)
        except (RuntimeError, OSError, ValueError) as e:  # store unreachable, no manifest, bad sha256, disk, ...
            error = f"init_from={uri!r}: {e}"
    failed = ddp_utils.all_reduce_sum(torch.tensor([float(error is not None)]))  # the barrier: all downloads done
    if failed.item():
        exit_all_ranks(error, ctx)  # said on the machine(s) where it failed
    return os.path.join(out_dir, S3_INIT)


def set_trainable(model, trainable: str) -> list:
    """model.set_trainable, with a bad `trainable` as a one-line error."""
    try:
        return model.set_trainable(trainable)
    except ValueError as e:
        fail(e)


def maybe_compile(model, enabled: bool):
    """torch.compile each transformer block (the loss code stays eager, it has Python control flow)."""
    if enabled:
        for block in [*model.layers, *model.extra_heads]:
            block.compile()
    return model


def get_lr(it: int, learning_rate: float, min_lr: float, warmup_iters: int, decay_iters: int) -> float:
    """Linear warm-up, then cosine decay to min_lr at decay_iters."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


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


def cat_padded(tensors, length=None):
    """The micro-batches of a step as one population: tensors (B_i, L_i, ...) zero-padded to
    `length` (default: the longest) along dim 1 and concatenated along dim 0. split_padded undoes it."""
    length = length or max(t.shape[1] for t in tensors)
    return torch.cat([F.pad(t, (0, 0) * (t.dim() - 2) + (0, length - t.shape[1])) for t in tensors])


def split_padded(x, like):
    """cat_padded's inverse: x (sum B_i, L, ...) back to the shapes of `like`'s (B_i, L_i, ...)."""
    return [xi[:, :t.shape[1]] for xi, t in zip(x.split([t.shape[0] for t in like]), like)]


# -----------------------------------------------------------------------------
# checkpoints, logging, start and end of a run

def save_run_all_ranks(model, optimizer, state: dict, config: dict, meta: dict, stage: str, ctx, out_dir,
                       names=("ckpt.pt",), uploader=None):
    """Write the run checkpoint to each of `names` in out_dir, atomically. A collective: every rank
    calls it (it gathers every rank's RNG state, and under fsdp the sharded weights and optimizer
    state); rank 0 writes the file. The caller then calls ddp_utils.barrier().
    With an uploader, rank 0 queues each file for S3 under a per-iteration name: ckpt.pt as
    ckpt_{iter:07d}.pt, which the manifest marks best when best.pt is written with it (one upload:
    the two files are the same checkpoint) and names `latest` (what init_from='s3://...' resumes
    from); final.pt as final_{iter:07d}.pt (weights only, so never `latest`). `names` is usually
    ("ckpt.pt", "best.pt") after an improved validation, ("ckpt.pt",) otherwise, ("final.pt",)
    at the end."""
    rngs = ddp_utils.gather_rng_states_all_ranks()
    dcp_dir = None
    if ctx.fsdp:  # the whole model gathered on rank 0 (same file format); optimizer state sharded (DCP)
        model_sd = ddp_utils.fsdp_full_state_dict(model)
        if optimizer is not None:
            dcp_dir = save_dcp_state(model, optimizer, state, out_dir, ctx)
    if not ctx.master:
        return
    ckpt = {
        "model": ddp_utils.clean_state_dict(model_sd if ctx.fsdp else ddp_utils.unwrap(model).state_dict()),
        "model_args": dataclasses.asdict(ddp_utils.unwrap(model).args),
        "stage": stage,
        "optimizer": optimizer.state_dict() if optimizer is not None and not ctx.fsdp else None,
        "dcp": dcp_dir,  # fsdp: model + optimizer state in this folder of out_dir (what resume reads)
        "iter": state["iter"], "epoch": state["epoch"], "sampler_pos": state["sampler_pos"],
        "rng": rngs, "best_val_loss": state["best_val_loss"], "config": config,
        "data": {"dir": meta["data_dir"], "vocab_size": meta["vocab_size"], "tokenizer": meta.get("tokenizer")},
    }
    for name in names:
        path = ddp_utils.save_checkpoint(os.path.join(out_dir, name), ckpt)
        if uploader is None or (name == "best.pt" and "ckpt.pt" in names):
            continue
        uploader.submit(path, f"{name.split('.')[0]}_{state['iter']:07d}.pt", iter_num=state["iter"],
                        is_best=name == "best.pt" or (name == "ckpt.pt" and "best.pt" in names),
                        latest=name == "ckpt.pt")
    if dcp_dir is not None:  # ckpt.pt now names the new folder: the older ones can go
        root = os.path.join(out_dir, "ckpt_dcp")
        for d in os.listdir(root):
            if os.path.join("ckpt_dcp", d) != dcp_dir:
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def save_dcp_state(model, optimizer, state: dict, out_dir, ctx) -> str:
    """fsdp: model and optimizer as a distributed checkpoint (every rank writes its own shards) in a
    new folder out_dir/ckpt_dcp/<iter>; returns that folder relative to out_dir, for ckpt.pt to name.
    The previous folder is removed only after the new ckpt.pt is written (save_run_all_ranks), so a
    crash mid-save leaves the previous ckpt.pt and its folder intact. out_dir must be storage that
    every node sees (the same as for resuming any multi-node run from out_dir). A collective."""
    name = [None]
    if ctx.master:
        base = name[0] = os.path.join("ckpt_dcp", f"{state['iter']:07d}")
        k = 1
        while os.path.exists(os.path.join(out_dir, name[0])):  # same iter saved twice: never overwrite
            name[0], k = f"{base}.{k}", k + 1
    dist.broadcast_object_list(name, src=0)
    ddp_utils.save_dcp(os.path.join(out_dir, name[0]), model, optimizer)
    return name[0]


def too_many_bad_steps(stepped: bool, state: dict, max_bad_steps: int, out_dir, logger, ctx) -> bool:
    """Count consecutive skipped steps; True once max_bad_steps is reached (the caller then saves
    the last good state, which the skipped steps never changed, and stops)."""
    if stepped:
        state["bad_steps"] = 0
        return False
    state["bad_steps"] = state.get("bad_steps", 0) + 1
    report(logger, ctx, {"iter": state["iter"], "train/skipped_step": 1, "train/bad_steps": state["bad_steps"]},
           prefix="non-finite loss or gradient norm, step skipped: ")
    if state["bad_steps"] >= max_bad_steps:
        if ctx.master:
            print(error_line(f"{state['bad_steps']} non-finite steps in a row (max_bad_steps={max_bad_steps}): "
                             f"stopping; the last good state goes to {out_dir}/ckpt.pt"), file=sys.stderr, flush=True)
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


def start_run(out_dir, ctx, config: dict, wandb_log=False, wandb_project="wmtp", wandb_run_name=None,
              s3_uri=None, s3_keep=3):
    """Rank 0 creates out_dir, clears temp files a killed save left behind, opens the metrics log
    (config: the settings, derived values included, for wandb) and, with s3_uri, the background
    uploader. Other ranks get (None, None). The caller then calls ddp_utils.barrier()."""
    if not ctx.master:
        return None, None
    os.makedirs(out_dir, exist_ok=True)
    ddp_utils.remove_stale_temp_files(out_dir)
    logger = ddp_utils.MetricsLogger(out_dir, wandb_log, wandb_project, wandb_run_name, config)
    uploader = None
    if s3_uri:
        from s3 import S3Uploader
        uploader = S3Uploader(s3_uri, keep=s3_keep)
    return logger, uploader


def finish_run(logger, uploader, ctx, code=0) -> int:
    """Wait for pending S3 uploads, close the log, leave the process group. Returns the exit code:
    `code` (the run's own: 1 after max_bad_steps), else EXIT_S3_FAILED on rank 0 when checkpoints
    did not reach S3 (they are all in out_dir), else 0.
    Under fsdp the process ends here, with that code, without the interpreter's shutdown: FSDP's
    device mesh (and torch's DTensor caches) keep the process group, and with it gloo's threads,
    alive past destroy_process_group, and a gloo thread that needs the GIL while the interpreter
    shuts down (a peer machine closing its connections, a last work released) is killed inside
    C++: "terminate called without an active exception", SIGABRT, a finished run reported as
    failed (3 of 6 runs on two machines; issue 15 was the same under DDP). Nothing is left to do."""
    if uploader is not None:
        not_uploaded = uploader.close(timeout=600)  # waits for pending uploads; prints what did not reach S3
        if not_uploaded:
            print(error_line(f"{len(not_uploaded)} checkpoint(s) did not reach {uploader.uri}; they are in out_dir "
                             f"(exit code {EXIT_S3_FAILED})"), file=sys.stderr, flush=True)
            code = code or EXIT_S3_FAILED
    if logger is not None:
        logger.finish()
    ddp_utils.cleanup()
    if ctx.fsdp:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
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
    m = ddp_utils.unwrap(model)
    blocks = [*m.layers, *m.extra_heads]
    n_trainable = sum(any(p.requires_grad for p in b.parameters()) for b in blocks)
    any_head_trains = m.output.weight.requires_grad or n_trainable > 0
    fpt = flops_per_token(m.args, int(seq_len), n_trainable, m.n_future_tokens if any_head_trains else 0)
    return fpt * tokens_per_s / (peak * ctx.world_size)
