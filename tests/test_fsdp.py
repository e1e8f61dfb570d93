"""FSDP2 for real: torchrun with 2 CPU processes on gloo, fsdp=True against fsdp=False (DDP).

Tolerances: fp32 on CPU; FSDP reduce-scatters every micro-step where DDP all-reduces once per step,
so sums are rounded in another order: train losses and gradient norms agree to rel 1e-5 (seen:
< 1e-7), final weights to atol 1e-6 + rtol 1e-5 (seen: < 3e-7), AdamW moments to rtol 1e-4 (seen:
< 2e-7 of each tensor's largest). FSDP resuming FSDP is bit-exact. (In bf16 on the CPU, not tested
here, losses agreed to ~2e-5 after 3 steps: FSDP also rounds the gathered norm weights to bf16.)
"""

import os
import shutil
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

import ddp_utils
import train_common as tc
from data.loader import load_meta
from evaluation import evaluate_all_ranks
from model import Transformer
from tests.helpers import FAST, MICRO, metrics, run, train_losses, val_losses

# 2 micro-steps per step (accumulation), clipping active (grad norms here are ~1), lr schedule pinned to 4 iters
COMMON = [*FAST, "--batch_size=8", "--gradient_accumulation_steps=2", "--eval_interval=2", "--learning_rate=3e-3",
          "--warmup_iters=0", "--lr_decay_iters=4", "--grad_clip=0.5"]


pytestmark = pytest.mark.slow  # many processes each (make test-fast skips them)

def weights(out_dir, name="final.pt"):
    return torch.load(os.path.join(out_dir, name), weights_only=False)["model"]


def one_process():
    """The context of a single CPU process, as ddp_utils.setup gives it."""
    return SimpleNamespace(ddp=False, fsdp=False, rank=0, local_rank=0, world_size=1, device="cpu", device_type="cpu",
                           master=True, local_master=True)


def val_loader(data_dir, ctx):
    _, _, loaders = tc.build_data(data_dir, ctx, batch_size=16, max_length=96, overflow="truncate", seed=0)
    return loaders["val"][0]


def assert_same_run(a, b, keys=("train/loss", "grad_norm")):
    """Two run dirs logged the same training (rel 1e-5) and ended with the same weights."""
    for key in keys:
        xs, ys = train_losses(a, key), train_losses(b, key)
        assert len(xs) == len(ys) > 0 and xs == pytest.approx(ys, rel=1e-5), key
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("arith_fsdp")
    run(["data/arith/prepare.py", f"--out_dir={d}", "--n_train_problems=60", "--n_val_problems=13",
         "--n_test_problems=5", "--seed=5"])
    return str(d)


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory):
    """Two iterations in one process: a normal ckpt.pt (whole optimizer state) at iteration 2."""
    out = str(tmp_path_factory.mktemp("single"))
    run(["train_baseline.py", f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2", *MICRO, *COMMON])
    return out


def resume(src, dst, data_dir, max_iters, fsdp):
    """Copy run dir `src` to `dst` and continue it to max_iters under torchrun (2 ranks)."""
    shutil.copytree(src, dst)
    run(["train_baseline.py", f"--data_dir={data_dir}", f"--out_dir={dst}", "--init_from=resume",
         f"--max_iters={max_iters}", f"--fsdp={fsdp}", *COMMON], torchrun=True)
    return str(dst)


@pytest.fixture(scope="module")
def stage0(single, data_dir, tmp_path_factory):
    """single's ckpt.pt continued to iteration 4 under DDP and under FSDP (trainable='all'); and under
    FSDP to 3, then resumed from that FSDP checkpoint (DCP) to 4."""
    tmp = tmp_path_factory.mktemp("stage0")
    runs = {"ddp": resume(single, tmp / "ddp", data_dir, 4, False),
            "fsdp": resume(single, tmp / "fsdp", data_dir, 4, True),
            "part": resume(single, tmp / "part", data_dir, 3, True)}
    runs["part_fsdp"] = resume(runs["part"], tmp / "part_fsdp", data_dir, 4, True)
    return runs


def test_fsdp_equals_ddp_stage0_and_resumes_a_single_process_checkpoint(stage0):
    """From the same single-process checkpoint (weights + AdamW moments, so the moments must be
    sharded correctly too), two more steps of 2 micro-steps each: same losses, clipped gradient
    norms and weights under FSDP as under DDP."""
    assert [m["iter"] for m in metrics(stage0["fsdp"]) if "train/loss" in m] == [1, 2, 3, 4]
    assert min(train_losses(stage0["fsdp"], "grad_norm")) > 0.5  # clipping was active
    assert_same_run(stage0["ddp"], stage0["fsdp"])
    assert val_losses(stage0["fsdp"]) == pytest.approx(val_losses(stage0["ddp"]), rel=1e-6)


def test_fsdp_checkpoint_layout(stage0):
    out = stage0["fsdp"]
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert ckpt["iter"] == 4 and len(ckpt["rng"]) == 2 and ckpt["config"]["fsdp"] is True
    assert ckpt["optimizer"] is None and ckpt["dcp"] == os.path.join("ckpt_dcp", "0000004")  # AdamW state: sharded
    assert os.listdir(os.path.join(out, "ckpt_dcp")) == ["0000004"]  # the older folders were removed
    assert os.path.isfile(os.path.join(out, "ckpt_dcp", "0000004", ".metadata"))
    # the whole model in the usual format: plain tensors, no wrapper prefixes, every key
    model = Transformer(Transformer.load(out).args)
    assert ckpt["model"].keys() == model.state_dict().keys()
    assert all(type(v) is torch.Tensor for v in ckpt["model"].values())
    assert torch.load(os.path.join(out, "final.pt"), weights_only=False)["dcp"] is None


def test_fsdp_resume_is_exact(stage0):
    """FSDP 2->3, then resume from its DCP 3->4 == FSDP 2->4 in one run, bit for bit."""
    assert train_losses(stage0["part_fsdp"]) == train_losses(stage0["fsdp"])
    a, b = weights(stage0["part_fsdp"]), weights(stage0["fsdp"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_checkpoint_resumes_in_one_process(stage0, data_dir):
    """init_from='resume' on the FSDP run's out_dir, in one process (what a single-process or DDP
    resume runs): the DCP folder loads into whole tensors. Weights: those of its ckpt.pt; AdamW
    state: the one the DDP run of the same steps saved whole in its own ckpt.pt."""
    ctx = one_process()
    meta = load_meta(data_dir)
    model, resume = tc.init_model("resume", ctx, meta, stage0["fsdp"], value_head=False, pad_vocab_multiple=1)
    model.set_trainable("all")
    optimizer = model.configure_optimizer(0.1, 3e-3, (0.9, 0.95), "cpu")
    model.tok_embeddings.weight.data.zero_()  # so the check below sees the DCP's weights, not ckpt.pt's
    state = tc.restore_state(resume, optimizer, ctx, model)
    assert state["iter"] == 4 and state["sampler_pos"] == resume["sampler_pos"]
    saved = weights(stage0["fsdp"], "ckpt.pt")
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    ours = optimizer.state_dict()["state"]
    ddp = torch.load(os.path.join(stage0["ddp"], "ckpt.pt"), weights_only=False)["optimizer"]["state"]
    assert ours.keys() == ddp.keys()
    for i in ddp:
        assert float(ours[i]["step"]) == float(ddp[i]["step"]) == 4
        torch.testing.assert_close(ours[i]["exp_avg"], ddp[i]["exp_avg"], rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(ours[i]["exp_avg_sq"], ddp[i]["exp_avg_sq"], rtol=1e-4, atol=1e-12)


def test_single_process_evaluates_the_fsdp_final_checkpoint(stage0, data_dir):
    """final.pt of the FSDP run, loaded in one process as eval.py/export.py do: its last val loss."""
    ctx = one_process()
    model = Transformer.load(os.path.join(stage0["fsdp"], "final.pt"))
    loss = evaluate_all_ranks(model, val_loader(data_dir, ctx), ctx, nullcontext())["val/loss"]
    assert loss == pytest.approx(val_losses(stage0["fsdp"])[-1], rel=1e-6)


def test_fsdp_equals_ddp_stage2_frozen_trunk(single, data_dir, tmp_path):
    """Stage 2 from a normal checkpoint (weights loaded before sharding, a fresh value head), trunk
    frozen but sharded, heads and value head trained: TD-weighted loss, value MSE, gradient norm
    and weights equal under FSDP and DDP."""
    common = ["train_verifiable.py", f"--data_dir={data_dir}", f"--init_from={single}/ckpt.pt", "--max_iters=2",
              "--trainable=heads+value_head", *COMMON]
    run(common + [f"--out_dir={tmp_path / 'ddp'}"], torchrun=True)
    run(common + [f"--out_dir={tmp_path / 'fsdp'}", "--fsdp=True"], torchrun=True)
    assert_same_run(str(tmp_path / "ddp"), str(tmp_path / "fsdp"), ("train/loss", "train/value_mse", "grad_norm"))
    frozen = "layers.0.attention.wq.weight"
    assert torch.equal(weights(str(tmp_path / "fsdp"))[frozen], weights(single, "ckpt.pt")[frozen])


def test_fsdp_needs_torchrun():
    with pytest.raises(ValueError, match="fsdp=True needs torchrun"):
        ddp_utils.setup("cpu", fsdp=True)
