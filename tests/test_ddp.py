"""DDP for real: torchrun with 2 CPU processes on gloo, against a single process."""

import json
import os

import pytest
import torch

from tests.helpers import FAST, MICRO, ROOT, metrics, run, train_losses, val_losses


pytestmark = pytest.mark.slow  # many processes each (make test-fast skips them)

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("arith_ddp")
    run(["data/arith/prepare.py", f"--out_dir={d}", "--n_train_problems=60", "--n_val_problems=13",
         "--n_test_problems=5", "--seed=5"])
    return str(d)


SHARD_SCRIPT = r"""
import json, sys
import torch.distributed as dist
import ddp_utils, train_common as tc
ctx = ddp_utils.setup("cpu")
meta, datasets, loaders = tc.build_data(sys.argv[1], ctx, batch_size=4, max_length=96, overflow="truncate", seed=7)
(train_loader, sampler), (val_loader, _) = loaders["train"], loaders["val"]
seen = {}
for epoch in range(2):
    sampler.set_epoch(epoch)
    seen[f"train{epoch}"] = [i for b in train_loader for i in b["index"].tolist()]
seen["val"] = [i for b in val_loader for i in b["index"].tolist()]
out = [None] * ctx.world_size
dist.all_gather_object(out, seen)
if ctx.master:
    json.dump({"ranks": out, "n_train": len(datasets["train"]), "n_val": len(datasets["val"])}, open(sys.argv[2], "w"))
ddp_utils.cleanup()
"""


def test_ranks_read_disjoint_shards_and_reshuffle_each_epoch(data_dir, tmp_path):
    script = tmp_path / "shards.py"
    script.write_text(SHARD_SCRIPT)
    out = tmp_path / "shards.json"
    run([str(script), data_dir, str(out)], torchrun=True, env={"PYTHONPATH": ROOT})
    res = json.loads(out.read_text())
    r0, r1 = res["ranks"]
    for epoch in ("train0", "train1"):
        a, b = r0[epoch], r1[epoch]
        assert len(a) == len(b) == (res["n_train"] + 1) // 2  # padded to equal length
        assert set(a) | set(b) == set(range(res["n_train"]))  # together: the whole epoch
        assert len(set(a) & set(b)) <= res["n_train"] % 2  # disjoint but for the padding repeat
    assert r0["train0"] != r0["train1"]  # a new order every epoch
    assert sorted(r0["val"] + r1["val"]) == list(range(res["n_val"]))  # validation: each sample exactly once


@pytest.fixture(scope="module")
def ddp_run(data_dir, tmp_path_factory):
    """A micro baseline trained under DDP (2 ranks), checkpoints written by rank 0."""
    out = str(tmp_path_factory.mktemp("ddp_base"))
    run(["train_baseline.py", f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=6", "--eval_interval=3",
         "--learning_rate=3e-3", *MICRO, *FAST, "--batch_size=8"], torchrun=True)
    return out


def test_ddp_training_logs_and_checkpoints(ddp_run):
    losses = train_losses(ddp_run)
    assert len(losses) == 6 and losses[-1] < losses[0]
    ckpt = torch.load(os.path.join(ddp_run, "final.pt"), weights_only=False)
    assert len(ckpt["rng"]) == 2 and ckpt["iter"] == 6  # every rank's RNG state


@pytest.mark.parametrize("stage", ["baseline", "verifiable"])
def test_eval_only_ddp_equals_single_process(stage, ddp_run, data_dir, tmp_path):
    """The same checkpoint's validation loss on 1 and on 2 processes (13 val problems: uneven shards)."""
    init = ddp_run
    if stage == "verifiable":  # a checkpoint with a value head: value MSE and AUC must agree too
        init = str(tmp_path / "critic")
        run(["train_critic.py", f"--data_dir={data_dir}", f"--out_dir={init}", f"--init_from={ddp_run}",
             "--max_iters=2", "--eval_interval=2", *FAST])
    common = [f"train_{stage}.py", f"--data_dir={data_dir}", f"--init_from={init}", "--eval_only=True", *FAST]
    run(common + [f"--out_dir={tmp_path / 'single'}"])
    run(common + [f"--out_dir={tmp_path / 'ddp'}"], torchrun=True)
    single, ddp = metrics(str(tmp_path / "single"))[-1], metrics(str(tmp_path / "ddp"))[-1]
    keys = ["val/loss"] + (["val/value_mse", "val/value_auc", "val/value_acc"] if stage == "verifiable" else [])
    for key in keys:
        assert ddp[key] == pytest.approx(single[key], rel=1e-6), key
    assert ddp["val/head_acc"] == pytest.approx(single["val/head_acc"], rel=1e-6)


def test_checkpoints_cross_load_between_ddp_and_single(ddp_run, data_dir, tmp_path):
    # written under DDP -> evaluated in one process: the DDP run's own last val loss
    single = str(tmp_path / "single")
    run(["train_baseline.py", f"--data_dir={data_dir}", f"--init_from={ddp_run}/final.pt", "--eval_only=True",
         f"--out_dir={single}", *FAST])
    assert val_losses(single)[-1] == pytest.approx(val_losses(ddp_run)[-1], rel=1e-6)
    # written by one process -> resumed under DDP (weights, optimizer, position; RNG per rank is noted)
    one = str(tmp_path / "one")
    run(["train_baseline.py", f"--data_dir={data_dir}", f"--out_dir={one}", "--max_iters=2", "--eval_interval=2",
         *MICRO, *FAST])
    p = run(["train_baseline.py", f"--data_dir={data_dir}", f"--out_dir={one}", "--init_from=resume",
             "--max_iters=4", "--eval_interval=2", *FAST], torchrun=True)
    assert "RNG not restored" in p.stdout
    assert [m["iter"] for m in metrics(one) if "train/loss" in m] == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def stage_inits(ddp_run, data_dir, tmp_path_factory):
    """What each stage starts from: the DDP base, a critic on it, and a reference for Rho-1 that is
    not the policy itself (two more steps of training; with policy == reference every excess loss
    is 0 and the top-k is decided by ties, i.e. by row order)."""
    critic, ref = str(tmp_path_factory.mktemp("critic")), str(tmp_path_factory.mktemp("ref"))
    run(["train_critic.py", f"--data_dir={data_dir}", f"--out_dir={critic}", f"--init_from={ddp_run}",
         "--max_iters=2", "--eval_interval=2", *FAST])
    run(["train_baseline.py", f"--data_dir={data_dir}", f"--out_dir={ref}", f"--init_from={ddp_run}",
         "--max_iters=2", "--eval_interval=2", "--learning_rate=1e-2", *FAST])
    return {"baseline": [f"--init_from={ddp_run}"], "critic": [f"--init_from={ddp_run}"],
            "verifiable": [f"--init_from={critic}", "--beta=0.3", "--whiten=True"],
            "rho1": [f"--init_from={ddp_run}", f"--ref_init_from={ref}"]}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["baseline", "critic", "verifiable", "rho1"])
def test_one_gradient_for_every_split_of_the_rows(stage, stage_inits, data_dir, tmp_path):
    """The same 16 rows per step as 16 x 1, 4 micro-steps x 4, and 2 ranks x 8 (torchrun): the same
    losses and the same gradient (its norm, unclipped), step after step. Each head is normalised by
    its targets over the whole step and all ranks; stage 2's weights (whitened and normalised) and
    Rho-1's top-k are taken over the whole step (the defaults weight_scope / selection_scope = 'step')."""
    common = [f"train_{stage}.py", f"--data_dir={data_dir}", "--max_iters=3", "--eval_interval=3", "--n_samples=48",
              "--grad_clip=0", "--warmup_iters=0", *stage_inits[stage], *FAST]
    splits = {"16x1": (["--batch_size=16"], False), "4x4": (["--batch_size=4", "--gradient_accumulation_steps=4"], False),
              "2x8": (["--batch_size=8"], True)}
    logs = {}
    for name, (args, torchrun) in splits.items():
        run(common + args + [f"--out_dir={tmp_path / name}"], torchrun=torchrun)
        logs[name] = [m for m in metrics(str(tmp_path / name)) if "grad_norm" in m]
    key = "train/value_mse" if stage == "critic" else "train/loss"
    ref = logs["16x1"]
    assert len(ref) == 3 and ref[0]["grad_norm"] > 0
    for name in ("4x4", "2x8"):
        assert [m[key] for m in logs[name]] == pytest.approx([m[key] for m in ref], rel=1e-5), name
        assert [m["grad_norm"] for m in logs[name]] == pytest.approx([m["grad_norm"] for m in ref], rel=1e-5), name


@pytest.mark.slow
def test_per_micro_batch_scope_depends_on_the_split(stage_inits, data_dir, tmp_path):
    """weight_scope='micro_batch' whitens/normalises each micro-batch on its own, so 16 x 1 and
    4 x 4 differ (the README says which population each setting uses); the loss normaliser itself
    is still the step's."""
    common = ["train_verifiable.py", f"--data_dir={data_dir}", "--max_iters=1", "--eval_interval=1", "--n_samples=16",
              "--grad_clip=0", *stage_inits["verifiable"][:1], "--beta=0.3", "--whiten=True",
              "--weight_scope=micro_batch", *FAST]
    run(common + ["--batch_size=16", f"--out_dir={tmp_path / 'a'}"])
    run(common + ["--batch_size=4", "--gradient_accumulation_steps=4", f"--out_dir={tmp_path / 'b'}"])
    a, b = (metrics(str(tmp_path / d))[0]["grad_norm"] for d in ("a", "b"))
    assert abs(a - b) / a > 1e-4

