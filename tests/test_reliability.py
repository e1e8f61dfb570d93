"""Nothing lost: the real train scripts, as real processes, under the failures a long run meets.

- kill -9 at a random moment after the first checkpoint (maybe mid-save): ckpt.pt still loads,
  its position is consistent, files are 0644, and init_from='resume' finishes the run;
- non-finite steps: skipped and counted, max_bad_steps stops the run (exit 1) with the start
  weights saved; a run where only the batches holding one poisoned token are bad completes;
- S3 (moto's server on loopback): manifest, init_from='s3://...' in a fresh out_dir, and a store
  that is down (training still ends with exit 0 and says what did not upload);
- bad input: a one-line error naming the thing, exit code 2, no traceback, no files written;
- wandb offline, disabled and unreachable: training completes either way.

Cost: every case is a process that imports torch (~1-3 s each). The bad-input cases run in one
'zygote' process that imports torch once and forks a child per case; each child runs the real
script (runpy, sys.argv set, its own exit code and stderr), which is what `python train_x.py`
does after its imports. One case runs both ways to show they agree.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import boto3
import numpy as np
import pytest
import torch

from data.loader import TokenDataset, load_meta, make_loader
from tests.helpers import FAST, MICRO, ROOT, S3Server, free_port, metrics

PY = sys.executable
BUCKET = "wmtp-rel"


pytestmark = pytest.mark.slow  # many processes each (make test-fast skips them)

def run(args, expect=0, env=None, timeout=180):
    """python args... in the repo root, one thread, bounded; asserts the exit code."""
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    p = subprocess.run([PY, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=e, umask=0o022)
    assert p.returncode == expect, f"exit {p.returncode}\nSTDOUT\n{p.stdout[-3000:]}\nSTDERR\n{p.stderr[-3000:]}"
    return p


def train_records(out_dir):
    return [m for m in metrics(out_dir) if "train/loss" in m]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("arith"))
    run(["data/arith/prepare.py", f"--out_dir={d}", "--n_train_problems=100", "--n_val_problems=10",
         "--n_test_problems=5", "--seed=3"])
    return d


@pytest.fixture(scope="module")
def base_dir(data_dir, tmp_path_factory):
    """A micro model after 2 steps: ckpt.pt, best.pt, final.pt."""
    out = str(tmp_path_factory.mktemp("base"))
    run(["train_baseline.py", f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2",
         *MICRO, *FAST])
    return out


# -----------------------------------------------------------------------------
# 1. kill -9, then resume


def test_sigkill_after_first_checkpoint_then_resume(data_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [PY, "train_baseline.py", f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=1000",
           "--eval_interval=1", *MICRO, *FAST]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), umask=0o022)
    delay = random.uniform(0.0, 0.5)  # lands anywhere in the step / eval / save cycle
    try:
        deadline = time.monotonic() + 120
        while not (out / "ckpt.pt").exists():
            assert proc.poll() is None, f"trainer exited {proc.returncode}: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, f"delay {delay:.3f}s"

    ckpt = torch.load(out / "ckpt.pt", weights_only=False)  # whole, whatever the kill interrupted
    k = ckpt["iter"]
    n_rows = load_meta(data_dir)["splits"]["train"]
    per_epoch = -(-n_rows // 16)  # batches of 16
    assert k >= 1 and ckpt["epoch"] == k // per_epoch and ckpt["sampler_pos"] == min((k % per_epoch) * 16, n_rows)
    evals = [m["iter"] for m in metrics(out) if "val/loss" in m]
    assert k in evals and max(evals) - k <= 1, f"ckpt iter {k}, validations logged up to {max(evals)}"
    assert ckpt["best_val_loss"] == min(m["val/loss"] for m in metrics(out) if "val/loss" in m and m["iter"] <= k)
    for name in ("ckpt.pt", "best.pt", "metrics.jsonl"):  # (best.pt is missing if the kill came before it)
        if name == "ckpt.pt" or (out / name).exists():
            assert (out / name).stat().st_mode & 0o777 == 0o644, name  # umask 022: readable by others
    stale = out / ".ckpt.pt.tmp.999999"  # what a kill during torch.save leaves
    stale.write_bytes(b"half a checkpoint")

    run(["train_baseline.py", f"--data_dir={data_dir}", f"--out_dir={out}", "--init_from=resume",
         f"--max_iters={k + 2}", "--eval_interval=1", *MICRO, *FAST])
    assert not list(out.glob(".*.tmp.*")), "stale temp files were not removed at start"
    assert [m["iter"] for m in train_records(str(out))][-2:] == [k + 1, k + 2]
    final = torch.load(out / "final.pt", weights_only=False)
    assert final["iter"] == k + 2 and (out / "final.pt").stat().st_mode & 0o777 == 0o644


# -----------------------------------------------------------------------------
# 2. numerical faults


def test_every_step_non_finite_stops_at_max_bad_steps(base_dir, data_dir, tmp_path):
    ckpt = torch.load(os.path.join(base_dir, "ckpt.pt"), weights_only=False)
    ckpt["model"]["output.weight"][0, 0] = float("nan")  # every logit row gets a NaN: every loss is NaN
    bad = str(tmp_path / "nan.pt")
    torch.save(ckpt, bad)
    out = str(tmp_path / "run")
    p = run(["train_baseline.py", f"--data_dir={data_dir}", f"--out_dir={out}", f"--init_from={bad}",
             "--max_bad_steps=3", "--max_iters=20", "--eval_interval=10", *MICRO, *FAST], expect=1)
    last = p.stderr.strip().splitlines()[-1]
    assert "Traceback" not in p.stderr and "non-finite" in last and "max_bad_steps=3" in last, p.stderr
    assert [m["train/bad_steps"] for m in metrics(out) if "train/bad_steps" in m] == [1, 2, 3]
    saved = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert saved["model"].keys() == ckpt["model"].keys()
    for k, v in ckpt["model"].items():  # no step was taken: the start weights, NaN included
        torch.testing.assert_close(saved["model"][k], v, rtol=0, atol=0, equal_nan=True)
    assert saved["optimizer"]["state"] == {}
    assert not os.path.exists(os.path.join(out, "final.pt"))


def test_some_steps_non_finite_are_skipped_and_the_run_completes(base_dir, data_dir, tmp_path):
    """inf in the embedding row of a token found in only a few training rows (and no validation
    row): exactly the steps whose batch holds that token are skipped, the rest train normally."""
    meta = load_meta(data_dir)

    def rows_with(split):  # (V,) number of rows holding each token
        ds = TokenDataset(data_dir, split)
        count = np.zeros(meta["vocab_size"], dtype=np.int64)
        for i in range(len(ds)):
            count[np.unique(ds[i]["tokens"])] += 1
        return count

    train, val = rows_with("train"), rows_with("val")
    special = {meta["bos_id"], meta["eos_id"], meta["pad_id"]}
    rare = [t for t in np.argsort(train, kind="stable") if 1 <= train[t] <= 8 and val[t] == 0 and t not in special]
    if not rare:
        pytest.skip("no token of this data set is in 1..8 training rows and no validation row")
    tok = int(rare[0])  # at most 8 bad steps: max_bad_steps=10 cannot stop the run
    # the training order of the run below: same dataset, loader and seed as train_baseline.py
    ds = TokenDataset(data_dir, "train", max_length=96)
    loader, sampler = make_loader(ds, 16, meta["pad_id"], shuffle=True, seed=1337)
    sampler.set_epoch(0)
    expected = [i for i, b in enumerate(loader) if (b["input_ids"] == tok).any()]
    n_iters = len(loader)

    ckpt = torch.load(os.path.join(base_dir, "ckpt.pt"), weights_only=False)
    ckpt["model"]["tok_embeddings.weight"][tok] = float("inf")
    bad = str(tmp_path / "inf.pt")
    torch.save(ckpt, bad)
    out = str(tmp_path / "run")
    run(["train_baseline.py", f"--data_dir={data_dir}", f"--out_dir={out}", f"--init_from={bad}",
         "--n_epochs=1", "--eval_interval=1000", *MICRO, *FAST])
    log = metrics(out)
    skipped = [m["iter"] - 1 for m in log if m.get("train/skipped_step")]  # iter counts attempted steps
    assert skipped == expected, f"token {tok} in {train[tok]} rows"
    streaks = []  # consecutive bad steps count up, a good step resets the count
    for i, it in enumerate(expected):
        streaks.append(streaks[-1] + 1 if i and expected[i - 1] == it - 1 else 1)
    assert [m["train/bad_steps"] for m in log if "train/bad_steps" in m] == streaks
    good = [m for m in train_records(out) if m["iter"] - 1 not in expected]
    assert len(good) == n_iters - len(expected) and all(np.isfinite(m["train/loss"]) for m in good)
    assert np.isfinite([m["val/loss"] for m in log if "val/loss" in m]).all()
    final = torch.load(os.path.join(out, "final.pt"), weights_only=False)["model"]
    emb = final["tok_embeddings.weight"]
    assert torch.isinf(emb[tok]).all() and torch.isfinite(torch.cat([emb[:tok], emb[tok + 1:]])).all()
    assert all(torch.isfinite(v).all() for k, v in final.items() if k != "tok_embeddings.weight")


# -----------------------------------------------------------------------------
# 3. S3 end to end (moto's server on loopback)


@pytest.fixture
def s3_store(monkeypatch):
    server = S3Server()
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(k, raising=False)
    server.reset()  # moto keeps its state per process, across servers: start from an empty store
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client
    server.stop()


def manifest(client, prefix):
    return json.loads(client.get_object(Bucket=BUCKET, Key=f"{prefix}/manifest.json")["Body"].read())


def test_s3_manifest_and_resume_in_a_fresh_out_dir(s3_store, data_dir, tmp_path):
    s3 = s3_store
    uri = f"s3://{BUCKET}/run1"
    common = [f"--data_dir={data_dir}", "--eval_interval=2", f"--s3_uri={uri}", *MICRO, *FAST]
    out1, out2 = str(tmp_path / "a"), str(tmp_path / "b")
    p = run(["train_baseline.py", f"--out_dir={out1}", "--max_iters=4", *common])
    assert f"s3: all 3 checkpoint(s) uploaded to {uri}" in p.stdout
    m = manifest(s3, "run1")
    assert [(c["name"], c["iter"]) for c in m["checkpoints"]] == [
        ("ckpt_0000002.pt", 2), ("ckpt_0000004.pt", 4), ("final_0000004.pt", 4)]
    assert m["latest"] == "ckpt_0000004.pt"  # the final (weights-only) file is never what resume picks
    vals = {r["iter"]: r["val/loss"] for r in metrics(out1) if "val/loss" in r}
    assert m["best"] == f"ckpt_{min(vals, key=vals.get):07d}.pt"
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"])
    assert keys == sorted(f"run1/{c['name']}" for c in m["checkpoints"]) + ["run1/manifest.json"]
    local = open(os.path.join(out1, "ckpt.pt"), "rb").read()  # iter 4
    assert s3.get_object(Bucket=BUCKET, Key="run1/ckpt_0000004.pt")["Body"].read() == local

    run(["train_baseline.py", f"--out_dir={out2}", f"--init_from={uri}", "--max_iters=6", *common])
    assert open(os.path.join(out2, "s3_init.pt"), "rb").read() == local
    assert [r["iter"] for r in train_records(out2)] == [5, 6]
    assert torch.load(os.path.join(out2, "final.pt"), weights_only=False)["iter"] == 6
    m = manifest(s3, "run1")
    assert m["latest"] == "ckpt_0000006.pt"
    vals.update({r["iter"]: r["val/loss"] for r in metrics(out2) if "val/loss" in r})
    best = f"ckpt_{min(vals, key=vals.get):07d}.pt"
    newest = ["final_0000004.pt", "ckpt_0000006.pt", "final_0000006.pt"]  # s3_keep=3, plus the best
    assert m["best"] == best
    assert [c["name"] for c in m["checkpoints"]] == ([] if best in newest else [best]) + newest


def test_s3_down_training_completes_and_reports(data_dir, tmp_path):
    uri = f"s3://{BUCKET}/run2"
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens: connection refused
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_MAX_ATTEMPTS": "1", "WMTP_S3_MAX_RETRIES": "1", "WMTP_S3_BACKOFF": "0.05"}
    out = str(tmp_path / "run")
    t0 = time.monotonic()
    p = run(["train_baseline.py", f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2",
             f"--s3_uri={uri}", *MICRO, *FAST], expect=3, env=env, timeout=120)  # 3: checkpoints missing on S3
    assert time.monotonic() - t0 < 100
    assert "s3: giving up on ckpt_0000002.pt" in p.stdout and "retry 1/1" in p.stdout  # a network error can heal
    assert f"s3: 2 checkpoint(s) NOT uploaded to {uri}: ckpt_0000002.pt, final_0000002.pt" in p.stdout
    assert p.stderr.strip().splitlines()[-1] == (f"train_baseline.py: error: 2 checkpoint(s) did not reach {uri}; "
                                                 f"they are in out_dir (exit code 3)")
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout
    assert torch.load(os.path.join(out, "final.pt"), weights_only=True)["iter"] == 2


def test_s3_bucket_missing_fails_fast_and_exits_3(s3_store, data_dir, tmp_path):
    """A bucket that does not exist cannot heal: no retries (the default 5, with a 1 s backoff
    doubling, wait ~31 s per checkpoint), the run finishes with every checkpoint in out_dir,
    reports, and exits 3 (train_common.EXIT_S3_FAILED, README 'Exit codes')."""
    uri = "s3://no-such-bucket/run"
    out = str(tmp_path / "run")
    t0 = time.monotonic()
    p = run(["train_baseline.py", f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2",
             f"--s3_uri={uri}", *MICRO, *FAST], expect=3, env={"WMTP_S3_MAX_RETRIES": "5", "WMTP_S3_BACKOFF": "1.0"})
    assert time.monotonic() - t0 < 60 and "retry" not in p.stdout
    assert p.stdout.count("NoSuchBucket") == 2 and p.stdout.count("cannot heal, not retried") == 2
    assert f"s3: 2 checkpoint(s) NOT uploaded to {uri}: ckpt_0000002.pt, final_0000002.pt" in p.stdout
    assert p.stderr.strip().splitlines()[-1] == (f"train_baseline.py: error: 2 checkpoint(s) did not reach {uri}; "
                                                 f"they are in out_dir (exit code 3)")
    assert [torch.load(os.path.join(out, name), weights_only=True)["iter"]
            for name in ("ckpt.pt", "best.pt", "final.pt")] == [2, 2, 2]


# -----------------------------------------------------------------------------
# 4. bad input: one line on stderr naming the thing, exit 2, no traceback, nothing written

ZYGOTE = r"""
import json, os, runpy, signal, sys, traceback
sys.path.insert(0, os.getcwd())
import numpy, torch, boto3  # the expensive imports, once
import ddp_utils, model, train_common, weighting  # noqa: F401
cases, logs = json.load(open(sys.argv[1])), sys.argv[2]
codes = []
for i, case in enumerate(cases):
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: what `python script args...` does after its imports
        code = 1
        try:
            signal.alarm(60)
            for fd, name in ((1, "out"), (2, "err")):
                os.dup2(os.open(f"{logs}/{i}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            os.environ.update(case["env"])
            sys.argv = case["argv"]
            try:
                runpy.run_path(sys.argv[0], run_name="__main__")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(json.dumps(codes))
"""


@pytest.fixture(scope="module")
def bad_inputs(base_dir, data_dir, tmp_path_factory):
    """The files of the bad-input cases: broken checkpoints, a Meta dir and a data dir that lie."""
    d = tmp_path_factory.mktemp("bad")
    ckpt = torch.load(os.path.join(base_dir, "ckpt.pt"), weights_only=False)

    def save(name, **changes):
        torch.save({**ckpt, **changes}, d / name)
        return str(d / name)

    files = {
        "shape": save("shape.pt", model_args={**ckpt["model_args"], "dim": 64}),
        "missing": save("missing.pt", model={k: v for k, v in ckpt["model"].items() if k != "norm.weight"}),
        "newer": save("newer.pt", model_args={**ckpt["model_args"], "attention_sink": 8}),
    }
    from model import ModelArgs, Transformer
    args70 = {**ckpt["model_args"], "vocab_size": 70}
    files["vocab70"] = save("vocab70.pt", model_args=args70, model=Transformer(ModelArgs(**args70)).state_dict())
    meta_dir = d / "meta"
    meta_dir.mkdir()
    (meta_dir / "params.json").write_text(json.dumps({**ckpt["model_args"], "dim": 64}))
    torch.save(ckpt["model"], meta_dir / "consolidated.pth")
    files["meta"] = str(meta_dir)
    lying = d / "lying_data"
    shutil.copytree(data_dir, lying)
    meta = json.loads((lying / "meta.json").read_text())
    (lying / "meta.json").write_text(json.dumps({**meta, "vocab_size": meta["vocab_size"] + 2}))
    files["lying_data"] = str(lying)
    return files


def bad_cases(f, data_dir, base_dir):
    """(id, script, args, env, text the error must contain)."""
    down = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}
    b = "train_baseline.py"
    return [
        ("unknown_key", b, ["--foo=1"], {}, "unknown config key 'foo'"),
        ("wrong_type", b, ["--batch_size=abc"], {}, "batch_size expects int"),
        ("missing_config_file", b, ["config/nope.py"], {}, "config/nope.py"),
        ("batch_size_0", b, ["--batch_size=0"], {}, "batch_size must be >= 1"),
        ("eval_interval_0", b, ["--eval_interval=0"], {}, "eval_interval must be >= 1"),
        ("cuda_absent", b, ["--device=cuda"], {}, "'cuda' requested but CUDA is not available"),
        ("mps_absent", b, ["--device=mps"], {}, "'mps' requested but MPS is not available"),
        ("s3_not_a_url", b, ["--s3_uri=notaurl"], {}, "s3_uri: not an S3 URI: 'notaurl'"),
        ("s3_no_bucket", b, ["--s3_uri=s3://"], {}, "'s3://'"),
        ("no_data", b, [f"--data_dir={data_dir}/nowhere"], {}, f"{data_dir}/nowhere/meta.json"),
        ("data_vocab_vs_tokenizer", b, [f"--data_dir={f['lying_data']}"], {},
         "lying_data/meta.json: field 'vocab_size'"),
        ("no_checkpoint", b, [f"--init_from={base_dir}/nope.pt"], {}, f"{base_dir}/nope.pt"),
        ("resume_without_checkpoint", b, ["--init_from=resume"], {}, "ckpt.pt"),
        ("model_args_vs_weights", b, [f"--init_from={f['shape']}"], {},
         "shape.pt: checkpoint is from another model shape"),
        ("params_json_vs_weights", b, [f"--init_from={f['meta']}"], {},
         "consolidated.pth: shapes do not match params.json"),
        ("missing_keys", b, [f"--init_from={f['missing']}"], {}, "missing keys ['norm.weight']"),
        ("unknown_model_args", b, [f"--init_from={f['newer']}"], {}, "newer.pt: model_args"),
        ("checkpoint_vocab_vs_data", b, [f"--init_from={f['vocab70']}"], {}, "model vocab_size 70"),
        ("s3_store_down", b, [f"--init_from=s3://{BUCKET}/run1"], down, f"s3://{BUCKET}/run1/manifest.json"),
        ("critic_no_checkpoint", "train_critic.py", [f"--init_from={base_dir}/nope.pt"], {}, "nope.pt"),
        ("rho1_no_reference", "train_rho1.py", [f"--init_from={base_dir}", f"--ref_init_from={base_dir}/nope"], {},
         "ref_init_from="),
    ]


def test_bad_input_is_one_line_and_exit_2(bad_inputs, data_dir, base_dir, tmp_path):
    cases = bad_cases(bad_inputs, data_dir, base_dir)
    specs = []
    for name, script, args, env, _ in cases:
        out = tmp_path / name
        specs.append({"argv": [script, f"--data_dir={data_dir}", f"--out_dir={out}", "--device=cpu", "--max_iters=1",
                               "--batch_size=4", *args], "env": env})
    (tmp_path / "cases.json").write_text(json.dumps(specs))
    logs = tmp_path / "logs"
    logs.mkdir()
    (tmp_path / "zygote.py").write_text(ZYGOTE)
    p = run([str(tmp_path / "zygote.py"), str(tmp_path / "cases.json"), str(logs)], timeout=300)
    codes = json.loads(p.stdout.strip().splitlines()[-1])
    problems = []
    for i, ((name, _, _, _, needle), code) in enumerate(zip(cases, codes)):
        err = (logs / f"{i}.err").read_text()
        last = err.strip().splitlines()[-1] if err.strip() else ""
        out = tmp_path / name
        if (code != 2 or "Traceback" in err or not last.startswith(f"{specs[i]['argv'][0]}: error: ")
                or needle not in last or (out.exists() and os.listdir(out))):
            files = os.listdir(out) if out.exists() else None
            problems.append(f"{name}: exit {code}, files {files}, stderr:\n{err[-1500:]}")
    assert not problems, "\n\n".join(problems)
    # the zygote's children behave as `python script ...` does: the same case as a plain process
    plain = run(specs[0]["argv"], expect=2)
    assert plain.stderr == (logs / "0.err").read_text()


# -----------------------------------------------------------------------------
# 5. wandb never stops a run


@pytest.mark.parametrize("mode", ["offline", "disabled", "unreachable"])
def test_wandb_modes(mode, data_dir, tmp_path):
    wdir = tmp_path / "wandb"
    env = {"WANDB_MODE": mode, "WANDB_DIR": str(wdir), "WANDB_CONFIG_DIR": str(wdir / "config"),
           "WANDB_CACHE_DIR": str(wdir / "cache"), "WANDB_DATA_DIR": str(wdir / "data"), "WANDB_SILENT": "true"}
    if mode == "unreachable":  # online, with a key, to a server that refuses connections: fail fast
        env.update(WANDB_MODE="online", WANDB_BASE_URL=f"http://127.0.0.1:{free_port()}", WANDB_API_KEY="x" * 40,
                   WANDB_INIT_TIMEOUT="5", WANDB__GRAPHQL_RETRY_MAX="1", WANDB__GRAPHQL_RETRY_WAIT_MAX_SECONDS="1")
    wdir.mkdir()
    out = str(tmp_path / "run")
    t0 = time.monotonic()
    p = run(["train_baseline.py", f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2",
             "--wandb_log=True", *MICRO, *FAST], env=env, timeout=150)
    assert [r["iter"] for r in train_records(out)] == [1, 2]
    assert os.path.exists(os.path.join(out, "final.pt"))
    warned = "warning: wandb disabled for this run" in p.stdout
    assert warned == (mode == "unreachable"), p.stdout[-2000:]
    if mode == "offline":
        assert len(list((wdir / "wandb").glob("offline-run-*"))) == 1
    if mode == "unreachable":
        assert time.monotonic() - t0 < 120
