"""Issue 15 (hardening) across the entry points: a checkpoint that would run code opened by each of
them (refused, nothing runs), every setting typed (None defaults included), an empty out_dir, the
scripts started from another directory, and a DDP eval-only run that leaves no thread alive at exit.
(Item by item elsewhere: tests/test_ddp_utils.py (the checkpoint reader), test_configurator.py,
test_eval.py (damaged split), test_data.py (truncated token files), test_s3.py and
test_reliability.py (S3 failures).)

Bad-input cases run in this process (conftest's run_main: the script as __main__ with sys.argv set),
since each stops before any work; the from-another-directory and DDP runs are real processes."""

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys

import boto3
import pytest
import torch

import ddp_utils
from configurator import declared_types
from model import ModelArgs, Transformer
from tests.helpers import S3Server
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
ENV = dict(os.environ, OMP_NUM_THREADS="1")
TRAIN = ["train_baseline.py", "train_critic.py", "train_verifiable.py", "train_rho1.py"]
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def arith_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("arith"))
    p = subprocess.run([PY, "data/arith/prepare.py", f"--out_dir={out}", "--n_train_problems=30",
                        "--n_val_problems=6", "--n_test_problems=3"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return out


def run_checkpoint(data_dir, extra=None, **data):
    """A micro model in the format train_*.py save (train_common.save_run), RNG state included."""
    tok = os.path.join(data_dir, "tokenizer.model")
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=3, n_heads=2, vocab_size=Tokenizer(tok).n_words, multiple_of=16,
                     n_future_tokens=2, max_seq_len=128)
    ckpt = {"model": Transformer(args).state_dict(), "model_args": dataclasses.asdict(args), "stage": "baseline",
            "optimizer": None, "dcp": None, "iter": 3, "epoch": 0, "sampler_pos": 0,
            "rng": [ddp_utils.get_rng_state()], "best_val_loss": 1.0, "config": {"out_dir": "out/x"},
            "data": {"dir": data_dir, "vocab_size": args.vocab_size, "tokenizer": tok, **data}}
    return {**ckpt, **(extra or {})}


@pytest.fixture(scope="module")
def good_ckpt(arith_dir, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("good") / "final.pt")
    ddp_utils.save_checkpoint(path, run_checkpoint(arith_dir))
    assert torch.load(path, weights_only=True)["iter"] == 3  # what save_run writes is weights-only
    return path


class Hostile:
    """Unpickling it runs `touch marker` (a real attack would run anything)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# -----------------------------------------------------------------------------
# 1. a checkpoint never runs code, whichever entry point opens it


@pytest.fixture(scope="module")
def hostile(arith_dir, tmp_path_factory):
    """A run checkpoint, a run dir whose ckpt.pt is that file (init_from=resume) and a Meta dir whose
    consolidated.pth would all create `marker` when unpickled in full."""
    d = tmp_path_factory.mktemp("hostile")
    marker = d / "pwned"
    good = run_checkpoint(arith_dir)
    files = {"marker": marker, "ckpt": str(d / "evil.pt"), "run_dir": str(d / "run"), "meta_dir": str(d / "meta")}
    ddp_utils.save_checkpoint(files["ckpt"], {**good, "extra": Hostile(marker)})
    ddp_utils.save_checkpoint(os.path.join(files["run_dir"], "ckpt.pt"), {**good, "extra": Hostile(marker)})
    os.makedirs(files["meta_dir"])
    with open(os.path.join(files["meta_dir"], "params.json"), "w") as f:
        json.dump({k: v for k, v in good["model_args"].items() if k != "max_seq_len"}, f)
    torch.save({**good["model"], "extra": Hostile(marker)}, os.path.join(files["meta_dir"], "consolidated.pth"))
    return files


ENTRY_POINTS = [  # (id, script, args); {ckpt} {run_dir} {meta_dir} {good} {data} {tmp} filled in
    ("baseline", "train_baseline.py", ["--init_from={ckpt}"]),
    ("critic", "train_critic.py", ["--init_from={ckpt}"]),
    ("verifiable", "train_verifiable.py", ["--init_from={ckpt}"]),
    ("rho1", "train_rho1.py", ["--init_from={ckpt}"]),
    ("rho1_reference", "train_rho1.py", ["--init_from={good}", "--ref_init_from={ckpt}"]),
    ("resume", "train_baseline.py", ["--init_from=resume", "--out_dir={run_dir}"]),
    ("meta_dir", "train_baseline.py", ["--init_from={meta_dir}"]),
    ("eval", "eval.py", ["--init_from={ckpt}", "--data_dir={data}", "--device=cpu"]),
    ("sample", "sample.py", ["--init_from={ckpt}", "--device=cpu"]),
    ("export", "export.py", ["--init_from={ckpt}", "--out_dir={tmp}/export"]),
]


@pytest.mark.parametrize("name, script, args", ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
def test_hostile_checkpoint_never_runs(name, script, args, hostile, good_ckpt, arith_dir, tmp_path, run_main):
    values = dict(hostile, good=good_ckpt, data=arith_dir, tmp=tmp_path)
    argv = [a.format(**values) for a in args]
    if script in TRAIN:
        argv = [f"--data_dir={arith_dir}", f"--out_dir={tmp_path / 'out'}", "--device=cpu", "--max_iters=1",
                "--batch_size=4", "--max_length=64", *argv]
    code, out, err = run_main(script, *argv)
    assert (code, err.count("\n")) == (2, 1), f"exit {code}\n{err[-2000:]}"
    assert err.startswith(f"{script}: error: ") and "Traceback" not in err
    assert "holds objects beyond tensors and plain containers (posix.system), refused" in err
    assert not hostile["marker"].exists()
    assert not os.listdir(tmp_path), os.listdir(tmp_path)  # nothing written (out_dir, export)


def test_hostile_checkpoint_from_s3_never_runs(hostile, arith_dir, tmp_path, monkeypatch, run_main):
    """init_from=s3://... downloads the manifest's latest checkpoint (moto's S3 server on loopback),
    then reads it with the same weights-only reader."""
    server = S3Server()
    try:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        server.reset()
        body = open(hostile["ckpt"], "rb").read()
        client = boto3.client("s3")
        client.create_bucket(Bucket="shared")
        client.put_object(Bucket="shared", Key="run/ckpt_0000003.pt", Body=body)
        manifest = {"version": 1, "latest": "ckpt_0000003.pt", "best": None, "checkpoints": [
            {"name": "ckpt_0000003.pt", "size": len(body), "sha256": hashlib.sha256(body).hexdigest(), "iter": 3}]}
        client.put_object(Bucket="shared", Key="run/manifest.json", Body=json.dumps(manifest).encode())
        code, out, err = run_main("train_baseline.py", f"--data_dir={arith_dir}", f"--out_dir={tmp_path}",
                                  "--device=cpu", "--init_from=s3://shared/run", "--max_iters=1")
    finally:
        server.stop()
    assert (code, err.count("\n")) == (2, 1), f"exit {code}\n{err[-2000:]}"
    assert f"{tmp_path / 's3_init.pt'}: holds objects beyond tensors and plain containers (posix.system)" in err
    assert "s3: downloaded s3://shared/run/ckpt_0000003.pt" in out and not hostile["marker"].exists()


def test_non_checkpoint_files_are_named(good_ckpt, tmp_path, run_main):
    """A tensor saved with torch.save, and random bytes, given where a checkpoint belongs (issue 15, item 8)."""
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    (tmp_path / "bytes.pt").write_bytes(os.urandom(4096))
    for name, what in [("tensor.pt", "holds a Tensor, not a dict with 'model' and 'model_args'"),
                       ("bytes.pt", "not a zip archive as torch.save writes")]:
        code, out, err = run_main("sample.py", f"--init_from={tmp_path / name}", "--device=cpu")
        assert (code, err.count("\n")) == (2, 1), err
        assert err.startswith(f"sample.py: error: {tmp_path / name}: not a wmtp checkpoint (") and what in err


# -----------------------------------------------------------------------------
# 2. every setting typed, None defaults included; 3. an empty out_dir

SCRIPTS = [*TRAIN, "eval.py", "sample.py", "export.py", "bench.py"]
TYPED = {  # the annotated settings of each script: every None default, and top_k (200, or None for all)
    "train_baseline.py": ["ffn_dim_multiplier", "lr_decay_iters", "max_iters", "n_kv_heads", "n_samples", "s3_uri"],
    "train_critic.py": ["lr_decay_iters", "max_iters", "n_samples", "s3_uri"],
    "train_verifiable.py": ["lr_decay_iters", "max_iters", "n_samples", "s3_uri"],
    "train_rho1.py": ["lr_decay_iters", "max_iters", "n_samples", "s3_uri"],
    "eval.py": ["n_problems", "top_k"],
    "sample.py": ["top_k"],
    "export.py": ["tokenizer"],
    "bench.py": ["ffn_dim_multiplier", "n_kv_heads"],
}
CASES = [(s, k, t) for s in SCRIPTS for k, t in sorted(declared_types(os.path.join(ROOT, s)).items())]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_none_default_has_a_type(script, run_main):
    """--help works (the configurator refuses a None default without a type) and lists a type with
    None for each None default; the annotated settings are the ones TYPED names."""
    code, out, err = run_main(script, "--help")
    assert code == 0, err
    lines = out.splitlines()[1:]
    assert all("| None)" in line for line in lines if line.split()[0].endswith("=None"))
    assert sorted(k for s, k, _ in CASES if s == script) == TYPED[script]


@pytest.mark.parametrize("script, key, types", CASES, ids=[f"{s}:{k}" for s, k, _ in CASES])
def test_none_default_settings_refuse_a_wrong_type(script, key, types, tmp_path, run_main):
    """--max_iters=abc and friends stop in the configurator, before any work, exit 2. A str setting
    keeps any command-line text, so its wrong type comes from a config file."""
    if str in types:
        (tmp_path / "cfg.py").write_text(f"{key} = 5\n")
        arg, expected = str(tmp_path / "cfg.py"), f"{key} in {str(tmp_path / 'cfg.py')!r} expects str or None, got 5"
    else:
        arg = f"--{key}=abc"
        expected = f"--{key} expects {' or '.join('None' if t is type(None) else t.__name__ for t in types)}, got 'abc'"
    code, out, err = run_main(script, arg, cwd=tmp_path)
    assert (code, err) == (2, f"{script}: error: {expected}\n")
    assert os.listdir(tmp_path) == (["cfg.py"] if str in types else [])


@pytest.mark.parametrize("script", [*TRAIN, "export.py"])
def test_empty_out_dir_refused_up_front(script, good_ckpt, tmp_path, run_main):
    """Before the data is read (the data_dir below does not exist) and before any model."""
    extra = [f"--init_from={good_ckpt}"] if script == "export.py" else [f"--data_dir={tmp_path}/nowhere", "--device=cpu"]
    code, out, err = run_main(script, "--out_dir=", *extra, cwd=tmp_path)
    assert (code, err.count("\n")) == (2, 1), err
    assert err.startswith(f"{script}: error: out_dir is empty: ")
    assert os.listdir(tmp_path) == []


# -----------------------------------------------------------------------------
# 5. eval.py, sample.py, export.py (and bench.py) started from another directory


@pytest.mark.slow
def test_scripts_run_from_another_directory(arith_dir, tmp_path):
    """configurator.py is found next to each script, and a checkpoint's data paths relative to the
    repo root (where runs start: data_dir='data/arith') still resolve. Four processes side by side."""
    ckpt = str(tmp_path / "run" / "final.pt")
    ddp_utils.save_checkpoint(ckpt, run_checkpoint(arith_dir, tokenizer=os.path.relpath(
        os.path.join(arith_dir, "tokenizer.model"), ROOT), dir=os.path.relpath(arith_dir, ROOT)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    commands = {
        "eval": [f"--init_from={ckpt}", f"--data_dir={arith_dir}", "--device=cpu", "--n_problems=2",
                 "--num_samples=0", "--max_new_tokens=6", f"--out={tmp_path / 'eval.json'}"],
        "sample": [f"--init_from={ckpt}", "--device=cpu", "--num_samples=1", "--max_new_tokens=4"],
        "export": [f"--init_from={ckpt}", f"--out_dir={tmp_path / 'export'}", "--dtype=float32"],
        "bench": ["--device=cpu", "--variants=['base']", "--warmup=1", "--iters=1", "--dim=32", "--n_layers=3",
                  "--n_heads=2", "--n_future_tokens=2", "--vocab_size=64", "--seq_len=16",
                  f"--json_out={tmp_path / 'bench.json'}"],
    }
    procs = {name: subprocess.Popen([PY, os.path.join(ROOT, f"{name}.py"), *args], cwd=elsewhere, env=ENV,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in commands.items()}
    results = {name: (p.wait(timeout=300), *p.communicate()) for name, p in procs.items()}
    for name, (code, out, err) in results.items():
        assert code == 0, f"{name}: exit {code}\n{err[-2000:]}"
    assert json.load(open(tmp_path / "eval.json"))["counts"]["problems"] == 2
    assert "---------- sample 1/1" in results["sample"][1]
    assert sorted(os.listdir(tmp_path / "export")) == ["consolidated.pth", "params.json", "tokenizer.model"]
    assert "tokens/s" in results["bench"][1] and os.path.isfile(tmp_path / "bench.json")
    assert os.listdir(elsewhere) == []


# -----------------------------------------------------------------------------
# 6. a DDP eval-only run exits cleanly

AT_EXIT = r"""
import atexit, os, runpy, sys

def threads_left():  # native threads too (gloo's), which threading.enumerate() does not see
    names = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")
                   if int(t) != os.getpid())
    os.write(1, f"rank {os.environ['RANK']} threads at exit: {names}\n".encode())  # one write: ranks share stdout

atexit.register(threads_left)  # runs as the interpreter starts to shut down
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc (Linux)")
def test_ddp_eval_only_leaves_no_thread_at_exit(arith_dir, good_ckpt, tmp_path):
    """The issue's command (torchrun, 2 ranks, gloo, eval_only=True) aborted at exit with "terminate
    called without an active exception" (SIGABRT on one rank) in 7 of 30 runs on a busy 2-core box
    (2 of 3 in the issue). Cause: building the model on the meta device imports torch._dynamo and with
    it torch.distributed.nn, whose functions hold the default process group as a default argument;
    so destroy_process_group could not free it, gloo's worker threads lived on into interpreter
    shutdown, and one still releasing the last all_reduce's tensor needed the GIL there and was
    killed inside a C++ destructor. Instead of repeating the racy run ~10 times (a 93% chance to catch
    it), this checks the cause once, deterministically: before the fix each rank had gloo's threads
    (pt_gloo_runloop x2, gloo_tcp_loop) alive at exit, every run; now none."""
    (tmp_path / "at_exit.py").write_text(AT_EXIT)
    p = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", str(tmp_path / "at_exit.py"),
                        os.path.join(ROOT, "train_baseline.py"), "--device=cpu", "--eval_only=True",
                        f"--init_from={good_ckpt}", f"--data_dir={arith_dir}", f"--out_dir={tmp_path / 'e'}",
                        "--batch_size=4", "--max_length=64"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and "terminate called" not in p.stderr, p.stderr[-3000:]
    assert "iter 0 | val/loss" in p.stdout  # a new run from a checkpoint file starts at iter 0
    assert sorted(re.findall(r"rank \d threads at exit: \[[^]]*\]", p.stdout)) == [
        "rank 0 threads at exit: []", "rank 1 threads at exit: []"], p.stdout[-3000:]
