"""
Runtime helpers shared by the four train_*.py scripts and the tools: device and DDP setup, the
few collectives the training loops call, placing a model on its device (FSDP included), the
optimizer step, atomic checkpoints, RNG state, and metrics logging.

The scripts call these inline (setup, barrier, all_reduce_sum, sync_gradients) so a reader sees
every distributed step in the training loop itself; nothing here hides a loop or a model. A
function that is itself a collective (every rank must call it) says so in its name or docstring.
"""

import glob
import json
import math
import os
import random
import sys
import warnings
import zipfile
from collections import OrderedDict
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# device and process group

PTDTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _pick_device(device):
    """'auto' -> cuda > mps > cpu; an explicit device that is absent is a one-line ValueError."""
    mps_ok = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if mps_ok else "cpu"
    device_type = device.split(":")[0]
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if device_type == "mps" and not mps_ok:
        raise ValueError(f"device {device!r} requested but MPS is not available")
    if device_type not in ("cuda", "mps", "cpu") or (device_type != "cuda" and ":" in device):
        raise ValueError(f"unknown device {device!r} (use 'auto', 'cuda', 'cuda:N', 'mps' or 'cpu')")
    if device_type == "cuda" and ":" in device:
        index = device.split(":", 1)[1]
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested but {torch.cuda.device_count()} CUDA "
                             f"device(s) are visible")
    return device


def setup(device="auto", fsdp=False):
    """Pick the device and, under torchrun (RANK is set), join the process group.

    Returns SimpleNamespace(ddp, fsdp, rank, local_rank, world_size, nodes, device, device_type, master,
    local_master). Under DDP on CUDA every process uses cuda:LOCAL_RANK, which is right on
    every node of a multi-node run (RANK is global, LOCAL_RANK counts GPUs on this machine);
    `master` (RANK 0) writes files once per run, `local_master` (LOCAL_RANK 0) does per-node work
    once per machine (e.g. an S3 download onto that machine's disk). `nodes`: the machines of the
    run (torchrun's GROUP_WORLD_SIZE, its --nnodes; 1 without torchrun).
    fsdp=True (FSDP2, see the FSDP2 section below) needs torchrun, also for one process
    (`torchrun --standalone --nproc_per_node=1`), and a CUDA or CPU device: a ValueError otherwise.
    """
    device = _pick_device(device)
    device_type = device.split(":")[0]
    ddp = int(os.environ.get("RANK", -1)) != -1
    if fsdp and not ddp:
        raise ValueError("fsdp=True needs torchrun (a process group to shard over), e.g. "
                         "torchrun --standalone --nproc_per_node=N ... (N=1 works too)")
    if fsdp and device_type == "mps":
        raise ValueError("fsdp=True runs on CUDA (nccl) or CPU (gloo), not on MPS")
    if ddp:
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        nodes = int(os.environ.get("GROUP_WORLD_SIZE", 1))
        # Before init_process_group, not after: torch.distributed.nn's functions take the default
        # group as a default argument, evaluated on import, and torch imports the module lazily (e.g.
        # torch._dynamo, which building a model on the meta device pulls in). Imported after init, it
        # keeps the group alive past destroy_process_group, so gloo's worker threads are still
        # there at interpreter exit, and one that is still releasing the last all_reduce's tensor
        # needs the GIL then: "terminate called without an active exception", SIGABRT (issue 15).
        import torch.distributed.nn  # noqa: F401
        if device_type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} "
                                 f"CUDA device(s) visible on this node")
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(local_rank)
            # device_id binds the NCCL communicator to this GPU (barriers then know the device)
            dist.init_process_group(backend="nccl", device_id=torch.device(device))
        else:
            dist.init_process_group(backend="gloo")
    else:
        rank, local_rank, world_size, nodes = 0, 0, 1, 1
        if device == "cuda":
            device = "cuda:0"
        if device.startswith("cuda:"):
            torch.cuda.set_device(device)
    return SimpleNamespace(ddp=ddp, fsdp=bool(fsdp), rank=rank, local_rank=local_rank, world_size=world_size,
                           nodes=nodes, device=device, device_type=device_type,
                           master=rank == 0, local_master=local_rank == 0)


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier():
    """Wait for every rank (no-op without DDP)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup():
    """Leave the process group, if one was joined: destroy_process_group stops its threads (see
    setup: nothing may hold the group past this), so none is left to run at interpreter exit."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def autocast_context(ctx, dtype: str):
    """bf16 autocast on CUDA/CPU/MPS when asked for; fp32 runs without autocast."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=ctx.device_type, dtype=PTDTYPE[dtype])


def place_model(model, ctx, dtype: str):
    """Move to the device, every weight in its training dtype: trainable ones fp32 (AdamW's master
    copy), frozen ones the compute dtype (a frozen bf16 trunk halves its memory), the value head
    fp32. One weight at a time, so a memory-mapped checkpoint is never copied whole on the host.
    fsdp: each block in turn is converted on the CPU and sharded over the ranks (each keeps
    1/world_size of it on its device: fsdp_shard_blocks), then the replicated rest (embeddings,
    norm, output, value head) moves; no GPU ever holds the whole model. Collective under fsdp."""
    def training_dtype(name, p):
        keep_fp32 = dtype == "float32" or p.requires_grad or name.startswith("value_head.")
        return torch.float32 if keep_fp32 else PTDTYPE[dtype]

    if ctx.fsdp:
        def convert_block(block):  # on the CPU, just before fully_shard moves its shards to the device
            for name, p in block.named_parameters():
                p.data = p.data.to(dtype=training_dtype(name, p))
        fsdp_shard_blocks(model, ctx, param_dtype=None if dtype == "float32" else PTDTYPE[dtype],
                          before_shard=convert_block)
    for name, p in model.named_parameters():
        if not is_sharded(p):
            p.data = p.data.to(device=ctx.device, dtype=training_dtype(name, p))
    return model


def memory_gb(ctx) -> float:
    """Peak memory of this process: the GPU's allocations on CUDA, the process's peak RSS elsewhere."""
    if ctx.device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9


# -----------------------------------------------------------------------------
# collectives


def _comm_device():
    """Where collective tensors must live: the current GPU for NCCL, anywhere for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def all_reduce_sum(tensor):
    """In-place SUM of `tensor` over ranks; returns it (unchanged in a single process).

    Reduce (sum, count) pairs and divide afterwards: mean = sum / count over all ranks. Never
    average per-rank means, which is wrong whenever ranks hold different numbers of tokens.
    """
    if not _distributed():
        return tensor
    comm = _comm_device()
    if comm is not None and tensor.device != comm:  # e.g. a CPU tensor under NCCL
        t = tensor.to(comm)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        tensor.copy_(t)
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sync_gradients(params, bucket_size=25_000_000):
    """Average .grad of `params` over ranks, with bucketed all-reduce (no-op in a single process).

    Why not torch DDP: the model's memory-efficient training step (model.forward_backward) runs
    backward once per MTP head and once more for the trunk, which DDP's reducer does not support
    (it expects one backward per forward). So the scripts accumulate gradients locally over all
    micro-steps and call this once before the optimizer step, which is what DDP does with
    no_sync() on every micro-step but the last.

    Parameters with requires_grad=False are skipped. A parameter whose .grad is None on every
    rank stays None (so the optimizer skips it exactly as in a single process); one that has a
    gradient on some ranks but not others gets zeros where it is missing, so every rank runs the
    same collectives. Gradients are flattened per (dtype, device) into buckets of about
    `bucket_size` elements, summed, divided by the world size and copied back.

    Under FSDP2 (fsdp=True) the sharded block parameters (DTensors) are skipped: FSDP already
    reduce-scattered their gradients in backward. What is left is the replicated rest
    (embeddings, final norm, output, value head), averaged here exactly as under DDP.
    """
    params = [p for p in params if p.requires_grad and not is_sharded(p)]
    if not _distributed() or not params:
        return
    world = dist.get_world_size()
    comm = _comm_device()
    # one small all-reduce tells every rank which parameters have a gradient anywhere
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=comm)
    dist.all_reduce(has_grad, op=dist.ReduceOp.SUM)
    grads = []
    for p, n in zip(params, has_grad.tolist()):
        if n == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)

    buckets = {}  # (dtype, device) -> list of buckets, each a list of grads
    for g in grads:
        group = buckets.setdefault((g.dtype, g.device), [[]])
        if group[-1] and sum(x.numel() for x in group[-1]) + g.numel() > bucket_size:
            group.append([])
        group[-1].append(g)
    for bucket in [b for group in buckets.values() for b in group]:
        flat = torch.cat([g.reshape(-1) for g in bucket])
        if comm is not None and flat.device != comm:
            flat = flat.to(comm)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def all_gather(tensor):
    """Every rank's `tensor` (the same shape on all), concatenated along dim 0 in rank order;
    `tensor` itself in a single process. A collective."""
    if not _distributed():
        return tensor
    comm = _comm_device()
    t = tensor.to(comm) if comm is not None else tensor
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out).to(tensor.device)


def optimizer_step(optimizer, params, grad_clip: float):
    """Clip the (already synced) gradients and step, unless their norm is non-finite: then the step
    is skipped, the same way on every rank (the norm is global). One host sync per optimizer step
    (not per micro-step). Returns (grad_norm tensor, stepped bool)."""
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    if any(is_sharded(p) for p in params):  # fsdp: sharded block grads + replicated rest
        grad_norm = clip_grad_norm_(params, max_norm)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    stepped = bool(torch.isfinite(grad_norm))
    if stepped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, stepped


def broadcast_parameters(model):
    """Copy rank 0's parameters and buffers to every rank (no-op in a single process).
    FSDP-sharded parameters are skipped: each rank's shard was cut from the same full weights
    (same seed or same file, see train_common.init_model), and a shard is rank-specific."""
    if not _distributed():
        return
    comm = _comm_device()
    for t in [t for t in list(model.parameters()) + list(model.buffers()) if not is_sharded(t)]:
        data = torch.view_as_real(t.data) if t.is_complex() else t.data
        if comm is not None and data.device != comm:
            tmp = data.to(comm)
            dist.broadcast(tmp, src=0)
            data.copy_(tmp)
        else:
            dist.broadcast(data, src=0)


# -----------------------------------------------------------------------------
# FSDP2 (fsdp=True): every transformer block sharded over the ranks, the small rest replicated
#
# Why the blocks and not the root: model.forward_backward calls backward once per MTP head and once
# more for the trunk. FSDP2 reshards a root's parameters at the end of every backward call, so a
# sharded root (embeddings, final norm, output) would be resharded after head 0's backward while
# head 1 still needs them. With only the blocks sharded, each block is its own FSDP root: it is
# all-gathered for its forward, resharded after it, gathered again for its one backward per
# micro-step, and its gradient is reduce-scattered (averaged over ranks) at the end of that
# backward call. The root-level weights (tok_embeddings, norm, output, value_head; 2 * vocab * dim
# = 262M for 7B, 4.2 GB with fp32 AdamW) stay whole on every rank and sync_gradients averages
# them once per step, as under DDP. Gradient accumulation: FSDP2 reduce-scatters every micro-step
# and adds into the sharded gradient (the same average as one sync at the end); skipping the sync
# with set_requires_gradient_sync(False) would keep every block's full gradient on every GPU
# until the last micro-step, which is the memory FSDP is here to save.


def is_sharded(t):
    """True for an FSDP2-sharded parameter or gradient (a DTensor). Nothing is one unless
    torch.distributed.tensor was imported, so single-process runs never import it (~1 s)."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def fsdp_shard_blocks(model, ctx, param_dtype=None, before_shard=None):
    """fully_shard every transformer block (trunk and heads, frozen ones too: that is where the
    memory is) over all ranks (a 1-D mesh, so across nodes too); the rest stays as it is.

    param_dtype: the dtype the gathered weights are used in (bf16 for dtype='bfloat16'; None: as
    stored). Gradients are reduce-scattered in fp32 into fp32 shards (AdamW's master copy).
    cast_forward_inputs=False leaves the block inputs as autocast made them (the fp32 residual
    stream), so the numerics are those of the unsharded model under autocast. fully_shard moves
    each block's parameters to ctx.device as it shards them: call it with the model still on the
    CPU and no GPU ever holds the whole model. before_shard(block) runs just before each block is
    sharded (train_common.place_model converts its dtypes there: one block at a time on the host).
    Call after set_trainable, before the optimizer. torch.compile of the blocks comes after this
    (train_common.maybe_compile)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(ctx.device_type, (ctx.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in [*model.layers, *model.extra_heads]:
        if before_shard is not None:
            before_shard(block)
        fully_shard(block, mesh=mesh, mp_policy=mp)
    return model


@torch.no_grad()
def clip_grad_norm_(params, max_norm):
    """torch.nn.utils.clip_grad_norm_ over a mix of FSDP-sharded (DTensor) and replicated
    gradients, which torch's own does not combine. Total 2-norm = sqrt(sum over ranks of the
    squared norms of the local shards + the squared norms of the replicated gradients, which
    sync_gradients already made equal on every rank, so they count once). Every gradient is then
    scaled by min(1, max_norm / (norm + 1e-6)), as torch does. The norm is the same on every rank,
    so a non-finite step is skipped everywhere. Call after sync_gradients."""
    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() for g in grads if is_sharded(g)]
    plain = [g for g in grads if not is_sharded(g)]
    device = (local + plain)[0].device if local or plain else torch.device("cpu")

    def squared_norm(ts):
        if not ts:
            return torch.zeros((), device=device)
        return torch.stack([torch.linalg.vector_norm(t, dtype=torch.float32).to(device) for t in ts]).pow(2).sum()

    total = (all_reduce_sum(squared_norm(local)) + squared_norm(plain)).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in local + plain:
        g.mul_(coef.to(g.device, g.dtype))
    return total


def fsdp_full_state_dict(model):
    """The whole model's state dict, unsharded, on rank 0's CPU ({} on the other ranks); the same
    keys and dtypes as model.state_dict() without FSDP. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_dcp(path, model, optimizer):
    """Distributed checkpoint (torch.distributed.checkpoint) of model and optimizer in the folder
    `path`: every rank writes its own shards in parallel, nothing is gathered; replicated tensors
    are written once. Every rank calls it; `path` must be on storage that all ranks (all nodes)
    see, or a later resume cannot read the other ranks' shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def load_dcp(path, model, optimizer):
    """Load save_dcp's folder into `model` and `optimizer`, whatever their layout now: FSDP-sharded
    (each rank reads its shards, for any world size) or whole (DDP or a single process: each rank
    reads everything). DCP reshards on load."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer)  # the layout to load into
    with warnings.catch_warnings():  # a single process loading is intended here, no need to say so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path, no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)


def load_full_optimizer_state(model, optimizer, saved):
    """A plain optimizer.state_dict() (a DDP or single-process checkpoint's, parameters numbered in
    param_groups order) into an optimizer over FSDP-sharded parameters: renumbered by parameter
    name, then set_optimizer_state_dict(full_state_dict=True) keeps each rank's shard of it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = {id(p): name for name, p in model.named_parameters()}
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if len(ids) != len(params):
        raise ValueError(f"the checkpoint's optimizer has {len(ids)} parameters, this run's {len(params)} "
                         "(another trainable setting?)")
    fqn = {i: names[id(p)] for i, p in zip(ids, params)}
    by_name = {"state": {fqn[i]: s for i, s in saved["state"].items()},
               "param_groups": [dict(g, params=[fqn[i] for i in g["params"]]) for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


# -----------------------------------------------------------------------------
# checkpoints


def unwrap(model):
    """The plain model under DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def clean_state_dict(state_dict):
    """Drop 'module.' and '_orig_mod.' components anywhere in the keys, so a checkpoint saved
    from a wrapped or compiled model loads into a plain one. (So never name a submodule 'module'.)"""
    out = OrderedDict()
    for k, v in state_dict.items():
        clean = ".".join(part for part in k.split(".") if part not in ("module", "_orig_mod"))
        if clean in out:
            raise ValueError(f"state dict keys collide after removing wrapper prefixes: {clean!r}")
        out[clean] = v
    return out


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path, obj):
    """torch.save `obj` to `path` atomically: a crash at any point leaves the previous file intact.

    Writes a temp file in the same folder (same filesystem, so os.replace is atomic), fsyncs it,
    renames it onto `path`, then fsyncs the folder so the rename itself survives a power loss.
    The file is created with open(), so its mode follows the umask (0644 under umask 022).
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)
    return path


def remove_stale_temp_files(out_dir):
    """Remove `.*.tmp.*` files left by a save or an upload that was killed. Call on rank 0 at
    start, before any save of this run. Returns the removed paths."""
    removed = []
    for p in glob.glob(os.path.join(glob.escape(out_dir), ".*.tmp.*")):
        if os.path.isfile(p):
            try:
                os.remove(p)
                removed.append(p)
            except OSError:
                pass
    return removed


def load_weights(path, mmap=True):
    """The one torch.load that reads a checkpoint or weights file (convert_trusted_checkpoint aside):
    onto the CPU, weights_only=True (only tensors, plain containers and numbers come out; opening a
    file never runs code from it), memory-mapped (tensors are read when used; the ranks of a node
    share the page cache). Also for weights that are not run checkpoints (Meta's consolidated.pth,
    value_head.pth). Every problem is a one-line error naming the file: missing (FileNotFoundError),
    not a complete torch.save file, or holding other objects (ValueError)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise ValueError(f"{path}: not a wmtp checkpoint (not a zip archive as torch.save writes: truncated, or "
                         f"another kind of file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # refused by the weights-only unpickler, or a broken file
        error = _first_line(e)
    try:
        found = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path)[:4])
    except Exception:
        found = ""
    if not found:
        raise ValueError(f"{path}: not a wmtp checkpoint (not a complete torch.save file: {error})")
    raise ValueError(f"{path}: holds objects beyond tensors and plain containers ({found}), refused: unpickling "
                     f"them could run code from the file. If you trust it (e.g. a checkpoint of an older wmtp, "
                     f"whose RNG state held numpy arrays), convert it once with python -c \"import ddp_utils; "
                     f"ddp_utils.convert_trusted_checkpoint('{path}')\"")


def load_checkpoint(path):
    """A run checkpoint ({'model', 'model_args', ...}, see train_common.save_run) read by load_weights;
    anything else is a one-line ValueError naming the file."""
    ckpt = load_weights(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        held = f"a dict with keys {list(ckpt)[:6]}" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        raise ValueError(f"{path}: not a wmtp checkpoint (holds {held}, not a dict with 'model' and 'model_args')")
    return ckpt


def convert_trusted_checkpoint(path):
    """Rewrite, in place, a checkpoint saved before checkpoints were weights-only (its numpy RNG
    state was an ndarray) so that load_checkpoint reads it. This unpickles the file in full,
    which can run code from it: only for files you trust."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    for state in ckpt.get("rng") or []:
        if state is not None and not isinstance(state["numpy"][1], list):
            name, keys, pos, has_gauss, cached = state["numpy"]
            state["numpy"] = (name, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached))
    save_checkpoint(path, ckpt)
    return load_checkpoint(path)


def _first_line(e):
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


# -----------------------------------------------------------------------------
# RNG state (exact resume)


def get_rng_state():
    """Python, numpy, torch CPU and (when present) every CUDA device's RNG state, as tensors, plain
    containers and numbers (numpy's key array as a list of ints), so that a checkpoint holding it
    loads with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def gather_rng_states_all_ranks():
    """[get_rng_state() of rank 0, rank 1, ...] (a checkpoint keeps them all for exact resume).
    A collective: every rank must call it, also the ones that do not write the checkpoint."""
    state = get_rng_state()
    if not _distributed():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def set_rng_state(state):
    """Restore get_rng_state()'s dict; device states that do not apply here are ignored
    (a CUDA checkpoint resumed on a CPU, or fewer GPUs than when it was saved)."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu().to(torch.uint8), i)
    if "mps" in state and hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"].cpu().to(torch.uint8))


# -----------------------------------------------------------------------------
# metrics


def _plain(v):
    """A JSON-friendly value: tensors and numpy scalars to Python numbers (or lists)."""
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, np.ndarray):
        return v.item() if v.size == 1 else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


class MetricsLogger:
    """Appends one JSON line per log() to out_dir/metrics.jsonl and, if asked, sends it to wandb.

    Rank 0 only. wandb's mode is left to the environment (WANDB_MODE=offline or disabled work);
    any wandb error prints one warning and turns wandb off for the rest of the run, because a
    logging service must never stop a training run.
    """

    def __init__(self, out_dir, wandb_log=False, wandb_project="wmtp", wandb_run_name=None,
                 config=None):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.file = open(self.path, "a")
        self.wandb = None  # the wandb run, while it works
        if wandb_log:
            try:
                import wandb
                self.wandb = wandb.init(project=wandb_project, name=wandb_run_name, config=config)
            except Exception as e:
                self._wandb_failed(e)

    def _wandb_failed(self, e):
        msg = (str(e).strip().splitlines() or [""])[0][:200]
        print(f"warning: wandb disabled for this run: {type(e).__name__}: {msg}", flush=True)
        self.wandb = None

    def log(self, d):
        d = {k: _plain(v) for k, v in d.items()}
        self.file.write(json.dumps(d) + "\n")
        self.file.flush()
        if self.wandb is not None:
            try:
                step = d.get("iter")
                self.wandb.log(d, step=int(step) if step is not None else None)
            except Exception as e:
                self._wandb_failed(e)

    def finish(self):
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as e:
                self._wandb_failed(e)
            self.wandb = None
        if not self.file.closed:
            self.file.close()


def _fmt(v):
    if isinstance(v, bool) or isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v == 0 or not math.isfinite(v):
            return str(v)
        if abs(v) >= 1000:
            return f"{v:.0f}"
        return f"{v:.4g}" if abs(v) >= 1e-3 else f"{v:.2e}"
    if isinstance(v, list):
        return "[" + " ".join(_fmt(x) for x in v) + "]"
    return str(v)


def format_metrics(d):
    """One compact console line, e.g. 'iter 100 | train/loss 2.346 | lr 3.00e-04 | tok/s 51234'."""
    return " | ".join(f"{k} {_fmt(_plain(v))}" for k, v in d.items())


# -----------------------------------------------------------------------------
# hardware peaks (MFU in the training logs and bench.py)

# Dense peak FLOP/s per GPU (no structured sparsity: NVIDIA's "with sparsity" figures halved), matched
# by substring of torch.cuda.get_device_name().lower(), first match wins (so PCIe/NVL before SXM).
# Sources: NVIDIA H100 datasheet (SXM: BF16 1979 / TF32 989 sparse, FP32 67; PCIe: BF16 1513 / TF32 756
# sparse, FP32 51; NVL: BF16 1671 / TF32 835 sparse, FP32 60), H200 datasheet (SXM as H100 SXM, NVL as
# H100 NVL), A100 datasheet (BF16 312 / TF32 156 dense, FP32 19.5).
PEAK_FLOPS = [
    ("h100 pcie", {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("h100 nvl", {"bf16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    ("h200 nvl", {"bf16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    ("h100", {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12}),  # SXM5, e.g. "NVIDIA H100 80GB HBM3"
    ("h200", {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12}),  # also GH200
    ("a100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
]


def peak_flops(device_name, dtype, tf32_on):
    """Dense peak FLOP/s for this GPU and compute dtype, or None if the GPU is not in PEAK_FLOPS."""
    key = "bf16" if dtype in ("bfloat16", "float16") else ("tf32" if tf32_on else "fp32")
    for sub, peaks in PEAK_FLOPS:
        if sub in device_name.lower():
            return peaks[key]
    return None
