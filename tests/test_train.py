"""The four stages end to end on a micro model and a small arith dataset, as real processes:
loss falls, checkpoints reload, resume is exact, and DDP (torchrun, gloo, 2 CPU processes)
agrees with a single process."""

import json
import os
import random
import subprocess

import pytest
import torch

from model import Transformer
from tests.helpers import FAST, MICRO, PY, ROOT, metrics, prepare_arith, run, train_losses, val_losses


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_arith(tmp_path_factory.mktemp("arith"))


@pytest.fixture(scope="module")
def base_dir(data_dir, tmp_path_factory):
    """A micro base model trained from scratch with the baseline stage (used by the later stages)."""
    out = str(tmp_path_factory.mktemp("base"))
    run(["train_baseline.py", f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=40", "--eval_interval=20",
         "--learning_rate=3e-3", "--warmup_iters=5", *MICRO, *FAST])
    return out


def test_baseline_from_scratch_learns_and_checkpoints_reload(base_dir, data_dir):
    losses = train_losses(base_dir)
    assert len(losses) == 40 and losses[-1] < 0.8 * losses[0]
    vals = val_losses(base_dir)
    assert len(vals) == 2 and vals[1] < vals[0]
    for name in ("ckpt.pt", "best.pt", "final.pt"):
        ckpt = torch.load(os.path.join(base_dir, name), weights_only=False)
        assert ckpt["stage"] == "baseline" and ckpt["iter"] == 40
        assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    model = Transformer.load(base_dir)
    assert model.n_future_tokens == 3 and model.value_head is None
    # eval_only on the final weights reproduces the last validation loss
    out = os.path.join(base_dir, "evalonly")
    run(["train_baseline.py", f"--data_dir={data_dir}", f"--out_dir={out}", f"--init_from={base_dir}/final.pt",
         "--eval_only=True", *FAST])
    assert val_losses(out) == pytest.approx([vals[-1]], rel=1e-6)


def test_critic_learns_value(base_dir, data_dir, tmp_path):
    out = str(tmp_path / "critic")
    run(["train_critic.py", f"--data_dir={data_dir}", f"--out_dir={out}", f"--init_from={base_dir}",
         "--max_iters=30", "--eval_interval=15", "--learning_rate=3e-3", *FAST])
    mse = train_losses(out, "train/value_mse")
    assert len(mse) == 30 and min(mse[-5:]) < mse[0]
    ckpt = torch.load(os.path.join(out, "final.pt"), weights_only=False)
    # only the value head trained: the trunk equals the base model's
    base = torch.load(os.path.join(base_dir, "final.pt"), weights_only=False)
    assert torch.equal(ckpt["model"]["layers.0.attention.wq.weight"], base["model"]["layers.0.attention.wq.weight"])
    assert any(k.startswith("value_head.") for k in ckpt["model"])


@pytest.mark.slow
def test_critic_learns_to_tell_correct_from_incorrect(base_dir, data_dir, tmp_path):
    """Rows whose label shows in every completion token (correct: '= 7 + 7 ...', incorrect: '= 3 + 3
    ...'), tokenized with the base's tokenizer: the critic on the frozen base trunk separates the
    validation rows (AUC of V at the last token 1.0; it starts near 0 or 1 by chance, as the two
    suffixes give nearly the same features), and its validation MSE falls."""
    rows = tmp_path / "rows"
    rows.mkdir()
    rng = random.Random(0)
    for split, n_rows in (("train", 160), ("val", 40)):
        with open(rows / f"{split}.jsonl", "w") as f:
            for i in range(n_rows):
                d = 7 if i % 2 == 0 else 3
                f.write(json.dumps({"problem_id": f"{split}-{i}", "prompt": f"Compute: {rng.randint(1, 9)} + 1\n",
                                    "completion": f"= {d} + {d}\n= {d}\nAnswer: {d}", "is_correct": d == 7}) + "\n")
    run(["data/format.py", f"--in_dir={rows}", f"--tokenizer={data_dir}/tokenizer.model", f"--out_dir={rows}"])
    out = str(tmp_path / "critic")
    run(["train_critic.py", f"--data_dir={rows}", f"--out_dir={out}", f"--init_from={base_dir}", "--max_iters=150",
         "--eval_interval=50", "--learning_rate=1e-2", "--min_lr=1e-2", "--warmup_iters=0", "--grad_clip=0",
         "--weight_decay=0", *FAST])
    evals = [m for m in metrics(out) if "val/value_auc" in m]
    assert len(evals) == 3 and evals[-1]["val/value_auc"] >= 0.95
    assert evals[-1]["val/value_mse"] < evals[0]["val/value_mse"] - 0.01


@pytest.fixture(scope="module")
def critic_dir(base_dir, data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("critic"))
    run(["train_critic.py", f"--data_dir={data_dir}", f"--out_dir={out}", f"--init_from={base_dir}",
         "--max_iters=10", "--eval_interval=10", *FAST])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("weight_mode", ["td", "shuffled", "oracle_prefix"])
def test_verifiable_learns_and_logs_weight_stats(critic_dir, data_dir, tmp_path, weight_mode):
    out = str(tmp_path / "verifiable")
    run(["train_verifiable.py", f"--data_dir={data_dir}", f"--out_dir={out}", f"--init_from={critic_dir}",
         "--max_iters=20", "--eval_interval=20", f"--weight_mode={weight_mode}", *FAST])
    losses = train_losses(out)
    assert len(losses) == 20 and sum(losses[-3:]) < sum(losses[:3])
    logged = [m for m in metrics(out) if "weights/mean" in m]
    assert logged and all(abs(m["weights/mean"] - 1.0) < 1e-4 for m in logged)  # normalized
    if weight_mode == "td":
        assert all(0.0 <= m["weights/frac_clipped"] <= 1.0 for m in logged)
    # the diagnostics: mean weight before and from each row's first wrong step (the oracle: 0 after it,
    # but for the rare correct rows whose slip still reached the right answer, which keep weight 1)
    assert all(m["weights/mean_on_track"] > 0 and m["weights/mean_off_track"] >= 0 for m in logged)
    if weight_mode == "oracle_prefix":
        assert all(m["weights/mean_off_track"] < 0.25 * m["weights/mean_on_track"] for m in logged)
    validations = [m for m in metrics(out) if "val/value_auc" in m]  # every one has the token-level AUC too
    assert validations and all(0.0 <= m["val/value_token_auc"] <= 1.0 for m in validations)
    assert Transformer.load(out).value_head is not None


@pytest.mark.slow
def test_rho1_cache_on_and_off_give_the_same_losses(base_dir, data_dir, tmp_path):
    common = ["train_rho1.py", f"--data_dir={data_dir}", f"--init_from={base_dir}", f"--ref_init_from={base_dir}",
              "--n_samples=64", "--n_epochs=3", "--eval_interval=100", *FAST]
    run(common + [f"--out_dir={tmp_path / 'on'}", "--ref_cache=True"])
    run(common + [f"--out_dir={tmp_path / 'off'}", "--ref_cache=False"])
    on, off = train_losses(str(tmp_path / "on")), train_losses(str(tmp_path / "off"))
    assert len(on) == len(off) == 12  # 64 rows / 16 per batch * 3 epochs
    assert on == pytest.approx(off, rel=1e-5, abs=1e-6)
    cached = [m["rho1/cached_rows"] for m in metrics(str(tmp_path / "on")) if "rho1/cached_rows" in m]
    assert cached[3] == 64 and cached[-1] == 64  # filled in the first epoch, reused after
    sel = [m["rho1/selected_frac"] for m in metrics(str(tmp_path / "on")) if "rho1/selected_frac" in m]
    assert all(s[0] == 1.0 and 0.6 <= s[1] <= 0.7 for s in sel)  # head 0 all, heads >= 1 ceil(60%)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["baseline", "critic", "verifiable", "rho1"])
def test_resume_is_bit_identical(stage, base_dir, critic_dir, data_dir, tmp_path):
    """7 iterations in one run == 3 iterations, then init_from='resume' for 4 more: same losses,
    same final weights, bit for bit (lr_decay_iters pins the schedule of the shorter first run)."""
    init = {"baseline": base_dir, "critic": base_dir, "verifiable": critic_dir, "rho1": base_dir}[stage]
    extra = [f"--ref_init_from={base_dir}"] if stage == "rho1" else []
    extra += ["--weight_mode=random"] if stage == "verifiable" else []  # draws from the RNG every step
    common = [f"train_{stage}.py", f"--data_dir={data_dir}", "--n_samples=40", "--eval_interval=3",
              "--lr_decay_iters=7", "--warmup_iters=2", "--pad_vocab_multiple=64",  # vocab 68 -> 128 rows
              *extra, *FAST, "--batch_size=8"]  # 5 batches/epoch
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run(common + [f"--out_dir={full}", f"--init_from={init}", "--max_iters=7"])
    run(common + [f"--out_dir={part}", f"--init_from={init}", "--max_iters=3"])
    run(common + [f"--out_dir={part}", "--init_from=resume", "--max_iters=7"])  # crosses an epoch boundary
    key = "train/value_mse" if stage == "critic" else "train/loss"
    assert len(train_losses(full, key)) == 7
    assert train_losses(part, key) == train_losses(full, key)
    a = torch.load(os.path.join(full, "final.pt"), weights_only=False)["model"]
    b = torch.load(os.path.join(part, "final.pt"), weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["output.weight"].shape[0] == 128 and a["output.weight"][68:].abs().max().item() == 0.0


@pytest.mark.slow
def test_padded_vocab_trains_like_unpadded(base_dir, data_dir, tmp_path):
    """The same run with embedding/output rows padded 68 -> 128: the same losses (the padded ids are
    masked); the padded rows keep exactly zero (no gradient, so AdamW never moves them)."""
    common = ["train_baseline.py", f"--data_dir={data_dir}", f"--init_from={base_dir}", "--n_samples=48",
              "--max_iters=6", "--eval_interval=3", "--warmup_iters=2", *FAST]
    run(common + [f"--out_dir={tmp_path / 'plain'}", "--pad_vocab_multiple=1"])
    run(common + [f"--out_dir={tmp_path / 'padded'}", "--pad_vocab_multiple=64"])
    plain, padded = train_losses(str(tmp_path / "plain")), train_losses(str(tmp_path / "padded"))
    assert len(plain) == 6 and max(abs(a - b) / a for a, b in zip(plain, padded)) < 1e-5
    vp, vq = val_losses(str(tmp_path / "plain")), val_losses(str(tmp_path / "padded"))
    assert len(vp) == 2 and max(abs(a - b) / a for a, b in zip(vp, vq)) < 1e-5
    ckpt = torch.load(os.path.join(tmp_path, "padded", "final.pt"), weights_only=False)
    assert ckpt["model_args"]["pad_vocab_multiple"] == 64
    for key in ("tok_embeddings.weight", "output.weight"):
        assert ckpt["model"][key].shape[0] == 128 and ckpt["model"][key][68:].abs().max().item() == 0.0


@pytest.mark.slow
def test_config_files_load_and_validate():
    """Every config/*.py only sets keys its script knows, with the right types (--help exits 0).
    The processes run side by side (each is mostly torch's import time)."""
    script = {"baseline": "train_baseline.py", "base": "train_baseline.py", "reference": "train_baseline.py",
              "critic": "train_critic.py", "verifiable": "train_verifiable.py", "rho1": "train_rho1.py",
              "fsdp": "train_baseline.py", "bench": "bench.py", "eval": "eval.py"}
    names = sorted(n for n in os.listdir(os.path.join(ROOT, "config")) if n.endswith(".py"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {name: subprocess.Popen([PY, script[next(s for s in script if s in name)], f"config/{name}", "--help"],
                                    cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for name in names}
    assert len(procs) >= 15
    for name, p in procs.items():
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0 and "settings" in out, f"config/{name}: exit {p.returncode}\n{err[-2000:]}"


@pytest.mark.slow
def test_a_copied_script_with_its_own_head_loss(base_dir, data_dir, tmp_path):
    """A fork changes the loss form in its copy of train_baseline.py and nowhere else: here heads
    k >= 1 count half. The copy runs as is; its first step's head losses are exactly the original
    script's, head 0 at 1x and the others at 0.5x (same weights and rows before the first update)."""
    source = open(os.path.join(ROOT, "train_baseline.py")).read()
    old = "            return (targets[..., k] * ce_k).sum() / n_targets[k]\n"
    assert source.count(old) == 1
    mine = os.path.join(ROOT, f"train_mine_{os.getpid()}.py")  # beside the original, as a fork's copy lives
    with open(mine, "w") as f:
        f.write(source.replace(old, "            return (1.0 if k == 0 else 0.5) * (targets[..., k] * ce_k).sum() / n_targets[k]\n"))
    try:
        common = [f"--data_dir={data_dir}", f"--init_from={base_dir}", "--max_iters=1", "--eval_interval=1", *FAST]
        run(["train_baseline.py", *common, f"--out_dir={tmp_path / 'orig'}"])
        run([os.path.basename(mine), *common, f"--out_dir={tmp_path / 'mine'}"])
    finally:
        os.remove(mine)
    orig, ours = (metrics(str(tmp_path / d))[0]["train/head_loss"] for d in ("orig", "mine"))
    assert len(orig) == 3 and ours == pytest.approx([orig[0], 0.5 * orig[1], 0.5 * orig[2]], rel=1e-6)
