"""ddp_utils: crash-safe checkpoints (SIGKILL in a real subprocess), RNG round trip, metrics
logging with wandb offline/disabled/broken, and the collectives for real on 2 gloo processes."""

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import ddp_utils
from ddp_utils import (MetricsLogger, clean_state_dict, convert_trusted_checkpoint, format_metrics, get_rng_state,
                       load_checkpoint, load_weights, remove_stale_temp_files, save_checkpoint, set_rng_state, unwrap)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(**extra):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def start(args, **popen):
    """Popen with a thread draining stdout into a queue, so reads can time out."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    proc.lines = queue.Queue()
    threading.Thread(target=lambda: [proc.lines.put(l.strip()) for l in proc.stdout], daemon=True).start()
    return proc


def wait_for_line(proc, want, timeout=30):
    """Block until the child prints `want` (bounded, so the test cannot hang)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.lines.get(timeout=max(deadline - time.monotonic(), 0.01)) == want:
                return
        except queue.Empty:
            break
    proc.kill()
    pytest.fail(f"child never printed {want!r}: {proc.stderr.read()[-2000:]}")


# -----------------------------------------------------------------------------
# atomic checkpoints

SLOW_SAVER = """
import io, sys, time, torch
import ddp_utils
path = sys.argv[1]
ddp_utils.save_checkpoint(path, {"iter": 1, "x": torch.full((1000,), 1.0)})
real_save = torch.save
def half_then_hang(obj, f):  # write half of the checkpoint, then stall: the kill lands mid-write
    buf = io.BytesIO(); real_save(obj, buf); data = buf.getvalue()
    f.write(data[:len(data) // 2]); f.flush()
    print("half written", flush=True)
    time.sleep(60)
    f.write(data[len(data) // 2:])
torch.save = half_then_hang
ddp_utils.save_checkpoint(path, {"iter": 2, "x": torch.full((1000,), 2.0)})
"""


@pytest.mark.slow
def test_sigkill_mid_save_keeps_previous_checkpoint(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(SLOW_SAVER)
    path = tmp_path / "ckpt.pt"
    proc = start([sys.executable, str(script), str(path)], env=child_env())
    try:
        wait_for_line(proc, "half written")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    ckpt = load_weights(str(path))
    assert ckpt["iter"] == 1 and torch.equal(ckpt["x"], torch.full((1000,), 1.0))
    tmp = tmp_path / f".ckpt.pt.tmp.{proc.pid}"
    assert tmp.is_file() and tmp.stat().st_size > 0  # the half-written temp file is left behind
    assert remove_stale_temp_files(str(tmp_path)) == [str(tmp)]
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "saver.py"]
    assert load_weights(str(path))["iter"] == 1


LOOP_SAVER = """
import sys, torch
import ddp_utils
i = 0
while True:
    i += 1
    ddp_utils.save_checkpoint(sys.argv[1], {"iter": i, "x": torch.full((2_000_000,), float(i))})
    print(i, flush=True)
"""


@pytest.mark.slow
def test_random_sigkill_during_save_loop(tmp_path):
    """No mocks: kill -9 a loop of real 8 MB saves at random moments; the file always loads whole."""
    script = tmp_path / "loop.py"
    script.write_text(LOOP_SAVER)
    path = tmp_path / "ckpt.pt"
    rng = random.Random(0)
    for _ in range(1):
        proc = start([sys.executable, str(script), str(path)], env=child_env())
        try:
            wait_for_line(proc, "2")  # at least one complete checkpoint exists from this child
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            proc.kill()
        ckpt = load_weights(str(path))
        assert ckpt["iter"] >= 2
        assert torch.equal(ckpt["x"], torch.full((2_000_000,), float(ckpt["iter"])))
        remove_stale_temp_files(str(tmp_path))
        assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "loop.py"]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_checkpoint_mode_follows_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = save_checkpoint(str(tmp_path / "sub" / "ckpt.pt"), {"a": 1})
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == mode
    assert load_weights(path) == {"a": 1}


def test_failed_save_keeps_previous_and_leaves_no_temp(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"iter": 1})
    with pytest.raises(Exception):
        save_checkpoint(path, {"iter": 2, "bad": lambda: 0})  # lambdas do not pickle
    assert load_weights(path) == {"iter": 1}
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_load_checkpoint_errors_name_the_file(tmp_path):
    """Each is one line naming the file and what it is not (issue 15, item 8)."""
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nope.pt"):
        load_checkpoint(missing)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint" * 10)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    truncated = tmp_path / "truncated.pt"
    save_checkpoint(str(truncated), {"model": {"w": torch.zeros(1000)}, "model_args": {}})
    truncated.write_bytes(truncated.read_bytes()[:-100])
    for path, what in [(corrupt, "not a zip archive as torch.save writes"),
                       (truncated, "not a zip archive as torch.save writes"),
                       (tensor, "holds a Tensor, not a dict with 'model' and 'model_args'")]:
        with pytest.raises(ValueError) as e:
            load_checkpoint(str(path))
        assert str(e.value).startswith(f"{path}: not a wmtp checkpoint (") and what in str(e.value)
        assert "\n" not in str(e.value)


class _Hostile:
    """Unpickling it would create a file (and could run anything else)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoints_never_run_code(tmp_path):
    """load_weights / load_checkpoint are weights-only: a pickle calling os.system is refused, one line."""
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "model_args": {}, "x": _Hostile(marker)}, path)
    for load in (load_checkpoint, load_weights):
        with pytest.raises(ValueError) as e:
            load(str(path))
        msg = str(e.value)
        assert msg.startswith(f"{path}: holds objects beyond tensors and plain containers (posix.system), refused")
        assert "convert_trusted_checkpoint" in msg and "\n" not in msg
    assert not marker.exists()


def test_old_checkpoint_refused_then_converted(tmp_path):
    """A checkpoint of the code before issue 15 kept numpy's RNG key array as an ndarray: refused,
    and readable after convert_trusted_checkpoint, with the same RNG stream."""
    np.random.seed(3)
    state = get_rng_state()
    name, keys, pos, has_gauss, cached = state["numpy"]
    old = dict(state, numpy=(name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    path = str(tmp_path / "old.pt")
    torch.save({"model": {}, "model_args": {}, "rng": [old]}, path)
    with pytest.raises(ValueError, match="numpy.*refused"):
        load_checkpoint(path)
    expected = np.random.rand(3).tolist()
    set_rng_state(convert_trusted_checkpoint(path)["rng"][0])
    assert np.random.rand(3).tolist() == expected
    assert torch.load(path, weights_only=True)["rng"][0]["numpy"][1] == keys


def test_clean_state_dict_and_unwrap():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3))
    sd = {"module._orig_mod.0.weight": 1, "_orig_mod.module.0.bias": 2, "layers.0._orig_mod.wq.weight": 3}
    assert list(clean_state_dict(sd).items()) == [("0.weight", 1), ("0.bias", 2), ("layers.0.wq.weight", 3)]
    with pytest.raises(ValueError, match="collide"):
        clean_state_dict({"module.w": 1, "w": 2})
    assert unwrap(model) is model  # the DDP and torch.compile wrappers: in the 2-process test


def test_rng_state_round_trip(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    random.random(), np.random.rand(), torch.rand(1)  # move away from the seeded state
    path = save_checkpoint(str(tmp_path / "rng.pt"), {"rng": get_rng_state()})
    first = (random.random(), np.random.rand(5).tolist(), torch.randn(5).tolist())
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    set_rng_state(load_weights(path)["rng"])
    assert (random.random(), np.random.rand(5).tolist(), torch.randn(5).tolist()) == first
    if not torch.cuda.is_available():
        state = load_weights(path)["rng"]
        state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]  # a GPU checkpoint resumed on a CPU
        set_rng_state(state)
        assert random.random() == first[0]


# -----------------------------------------------------------------------------
# setup (single process) and metrics


def test_setup_single_process_and_missing_device():
    ctx = ddp_utils.setup("cpu")
    assert (ctx.ddp, ctx.rank, ctx.local_rank, ctx.world_size, ctx.device, ctx.device_type, ctx.master,
            ctx.local_master) == (False, 0, 0, 1, "cpu", "cpu", True, True)
    ddp_utils.barrier()  # no-op without a process group
    t = torch.tensor([1.0, 2.0])
    assert ddp_utils.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' requested but CUDA is not available"):
            ddp_utils.setup("cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="device 'mps' requested but MPS is not available"):
            ddp_utils.setup("mps")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        ddp_utils.setup("tpu")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_metrics_logger_writes_jsonl(tmp_path):
    log = MetricsLogger(str(tmp_path))
    log.log({"iter": 0, "train/loss": torch.tensor(2.5), "heads": torch.tensor([1.0, 2.0]),
             "lr": np.float32(0.5), "n": np.int64(3)})
    log.log({"iter": 10, "val/loss": 1.25})
    log.finish()
    log = MetricsLogger(str(tmp_path))  # a resumed run appends
    log.log({"iter": 20, "val/loss": 1.0})
    log.finish()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"iter": 0, "train/loss": 2.5, "heads": [1.0, 2.0], "lr": 0.5, "n": 3},
        {"iter": 10, "val/loss": 1.25}, {"iter": 20, "val/loss": 1.0}]


def test_format_metrics():
    line = format_metrics({"iter": 100, "train/loss": torch.tensor(2.34567), "lr": 3e-4,
                           "tok/s": 51234.4, "heads": [2.5, 3.25]})
    assert line == "iter 100 | train/loss 2.346 | lr 3.00e-04 | tok/s 51234 | heads [2.5 3.25]"


WANDB_CHILD = """
import json, os, sys
from ddp_utils import MetricsLogger
log = MetricsLogger(sys.argv[1], wandb_log=True, wandb_project="wmtp-test", config={"lr": 0.1})
log.log({"iter": 1, "train/loss": 2.0})
print("wandb on:", log.wandb is not None, flush=True)
log.finish()
"""


@pytest.mark.slow
def test_metrics_logger_wandb_offline(tmp_path):
    out, wdir = tmp_path / "out", tmp_path / "wandb"
    wdir.mkdir()
    script = tmp_path / "child.py"
    script.write_text(WANDB_CHILD)
    env = child_env(WANDB_MODE="offline", WANDB_DIR=str(wdir), WANDB_SILENT="true")
    env.pop("WANDB_API_KEY", None)
    res = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "wandb on: True" in res.stdout and "warning" not in res.stdout
    assert read_jsonl(out / "metrics.jsonl") == [{"iter": 1, "train/loss": 2.0}]
    assert len(list((wdir / "wandb").glob("offline-run-*"))) == 1  # the run wandb can sync later


def test_metrics_logger_wandb_disabled_and_failures(tmp_path, monkeypatch, capsys):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))

    def boom(*a, **k):
        raise RuntimeError("wandb backend went away\nsecond line")
    log = MetricsLogger(str(tmp_path), wandb_log=True)
    assert log.wandb is not None
    log.log({"iter": 0, "train/loss": 3.0})  # WANDB_MODE=disabled: a no-op run, no warning
    assert log.wandb is not None and "warning" not in capsys.readouterr().out
    monkeypatch.setattr(log.wandb, "log", boom)
    log.log({"iter": 1, "train/loss": 2.0})  # wandb's log raises: warning, wandb off, no exception
    assert log.wandb is None
    log.log({"iter": 2, "train/loss": 1.5})
    log.finish()
    out = capsys.readouterr().out
    assert out.count("warning: wandb disabled") == 1 and "RuntimeError: wandb backend went away" in out
    assert [r["iter"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1, 2]

    monkeypatch.setattr(wandb, "init", boom)
    log = MetricsLogger(str(tmp_path / "b"), wandb_log=True)  # init raises: same
    assert log.wandb is None
    log.log({"iter": 3})
    log.finish()
    assert read_jsonl(tmp_path / "b" / "metrics.jsonl") == [{"iter": 3}]
    assert "warning: wandb disabled" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# collectives, for real: torchrun with 2 processes on gloo

DDP_CHILD = """
import os, sys, torch
import ddp_utils
out = sys.argv[1]
ctx = ddp_utils.setup("cpu")
r = ctx.rank

# (sum, count) reduction
t = torch.tensor([float(r + 1), 1.0])
assert ddp_utils.all_reduce_sum(t) is t

# parameters that differ per rank, then rank 0's copied everywhere
torch.manual_seed(100 + r)
model = torch.nn.ModuleDict({"a": torch.nn.Linear(7, 5), "b": torch.nn.Linear(5, 3),
                             "c": torch.nn.Linear(3, 2), "unused": torch.nn.Linear(2, 2),
                             "frozen": torch.nn.Linear(5, 1)})
model.register_buffer("buf", torch.randn(4))
model["c"].double()
model["frozen"].requires_grad_(False)
before = {k: v.clone() for k, v in model.state_dict().items()}
ddp_utils.broadcast_parameters(model)
after_bcast = {k: v.clone() for k, v in model.state_dict().items()}

# two micro-steps of local accumulation; 'c' gets a gradient on rank 0 only
torch.manual_seed(r)
for micro in range(2):
    x = torch.randn(4, 7)
    h = model["b"](model["a"](x)) + model["frozen"](model["a"](x))
    loss = h.pow(2).mean()
    if r == 0:
        loss = loss + model["c"](h.double()).sum()
    loss.backward()
local = {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}
ddp_utils.sync_gradients(model.parameters(), bucket_size=40)  # several buckets
synced = {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}

# wrappers (backend="eager": the same compile wrapper without importing inductor)
ddp = torch.nn.parallel.DistributedDataParallel(model["a"])
compiled = torch.compile(ddp, backend="eager")
assert ddp_utils.unwrap(compiled) is model["a"]
keys = list(ddp_utils.clean_state_dict(compiled.state_dict()))
torch.save({"ctx": vars(ctx), "sum": t, "main": ctx.master, "before": before,
            "after_bcast": after_bcast, "local": local, "synced": synced, "keys": keys},
           os.path.join(out, f"rank{r}.pt"))
ddp_utils.barrier()
ddp_utils.cleanup()
"""


@pytest.mark.slow
def test_collectives_two_processes_gloo(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(DDP_CHILD)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun] if os.path.exists(torchrun) else [sys.executable, "-m", "torch.distributed.run"]
    res = subprocess.run(cmd + ["--standalone", "--nproc_per_node=2", str(script), str(tmp_path)],
                         env=child_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in range(2))

    for i, r in enumerate((r0, r1)):
        assert r["ctx"] == dict(ddp=True, fsdp=False, rank=i, local_rank=i, world_size=2, nodes=1, device="cpu",
                                device_type="cpu", master=i == 0, local_master=i == 0)
        assert r["main"] == (i == 0)
        assert r["sum"].tolist() == [3.0, 2.0]
        assert r["keys"] == ["weight", "bias"]
    # broadcast: both ranks end with rank 0's initial weights and buffers (which differed)
    assert not torch.equal(r0["before"]["a.weight"], r1["before"]["a.weight"])
    for k in r0["before"]:
        assert torch.equal(r0["after_bcast"][k], r0["before"][k])
        assert torch.equal(r1["after_bcast"][k], r0["before"][k])
    # gradients: the mean of the per-rank accumulated gradients, identical on both ranks
    for name in ("a.weight", "a.bias", "b.weight", "b.bias"):
        expect = (r0["local"][name] + r1["local"][name]) / 2
        assert not torch.equal(r0["local"][name], r1["local"][name])
        for r in (r0, r1):
            torch.testing.assert_close(r["synced"][name], expect, rtol=0, atol=1e-7)
    for name in ("c.weight", "c.bias"):  # gradient on rank 0 only: missing one counts as zeros
        assert r1["local"][name] is None and r0["synced"][name].dtype == torch.float64
        for r in (r0, r1):
            torch.testing.assert_close(r["synced"][name], r0["local"][name] / 2, rtol=0, atol=1e-12)
    for name in ("unused.weight", "frozen.weight"):  # no gradient anywhere / frozen: left alone
        assert r0["synced"][name] is None and r1["synced"][name] is None
