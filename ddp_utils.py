"""
Runtime helpers shared by the four train_*.py scripts: device and DDP setup, the few collectives
the training loops call, atomic checkpoints, RNG state, and metrics logging.

The scripts call these inline (setup, barrier, all_reduce_sum, sync_gradients) so a reader sees
every distributed step in the training loop itself; nothing here hides a loop or a model.
"""

import glob
import json
import math
import os
import random
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# device and process group


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


def setup(device="auto"):
    """Pick the device and, under torchrun (RANK is set), join the process group.

    Returns SimpleNamespace(ddp, rank, local_rank, world_size, device, device_type, master,
    local_master). Under DDP on CUDA every process uses cuda:LOCAL_RANK, which is right on
    every node of a multi-node run (RANK is global, LOCAL_RANK counts GPUs on this machine).
    """
    device = _pick_device(device)
    device_type = device.split(":")[0]
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        world_size = int(os.environ.get("WORLD_SIZE", 1))
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
        rank, local_rank, world_size = 0, 0, 1
        if device == "cuda":
            device = "cuda:0"
        if device.startswith("cuda:"):
            torch.cuda.set_device(device)
    return SimpleNamespace(ddp=ddp, rank=rank, local_rank=local_rank, world_size=world_size,
                           device=device, device_type=device_type,
                           master=rank == 0, local_master=local_rank == 0)


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process():
    """True on rank 0, and in a single process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier():
    """Wait for every rank (no-op without DDP)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup():
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
    """
    params = [p for p in params if p.requires_grad]
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


def broadcast_parameters(model):
    """Copy rank 0's parameters and buffers to every rank (no-op in a single process)."""
    if not _distributed():
        return
    comm = _comm_device()
    for t in list(model.parameters()) + list(model.buffers()):
        data = torch.view_as_real(t.data) if t.is_complex() else t.data
        if comm is not None and data.device != comm:
            tmp = data.to(comm)
            dist.broadcast(tmp, src=0)
            data.copy_(tmp)
        else:
            dist.broadcast(data, src=0)


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


def load_checkpoint(path):
    """torch.load onto the CPU; a missing or unreadable file is a one-line error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        msg = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {msg}") from None


# -----------------------------------------------------------------------------
# RNG state (exact resume)


def get_rng_state():
    """Python, numpy, torch CPU and (when present) every CUDA device's RNG state."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state):
    """Restore get_rng_state()'s dict; device states that do not apply here are ignored
    (a CUDA checkpoint resumed on a CPU, or fewer GPUs than when it was saved)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
