"""Self-speculative decoding (sample.speculative_generate) against plain greedy decoding
(model.generate): token-for-token equal on random-weight micro models and on a micro model
trained until its heads agree (where drafts must actually be accepted), eos included."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from model import ModelArgs, Transformer
from sample import speculative_generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread is fastest on a busy 2-core box
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def micro_model(n_future_tokens, vocab_size=61, seed=0, n_layers=5, dim=48):
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=32,
                     n_future_tokens=n_future_tokens, max_seq_len=64)
    torch.manual_seed(seed)
    return Transformer(args).eval()


def prompts(vocab_size, n=6):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab_size, (length,), generator=g).tolist() for length in (1, 2, 5, 9, 17, 30)[:n]]


@pytest.mark.parametrize("n_future_tokens", [1, 2, 4])
def test_speculative_equals_plain_greedy_random_weights(n_future_tokens):
    model = micro_model(n_future_tokens)
    for p in prompts(model.args.vocab_size):
        ref = model.generate([p], 40)[0]
        out, st = speculative_generate(model, p, 40)
        assert out == ref
        assert st["tokens"] == 40 and sum(st["accepted_hist"]) == st["forwards"] - 1
        assert st["mean_accepted"] == pytest.approx(40 / st["forwards"])
        assert 1 <= st["forwards"] <= 40


@pytest.mark.parametrize("n_future_tokens", [2, 4])
def test_speculative_stops_at_eos_like_plain_greedy(n_future_tokens):
    model = micro_model(n_future_tokens, seed=3)
    for p in prompts(model.args.vocab_size, n=4):
        free = model.generate([p], 30)[0]
        for eos in (free[0], free[6], free[-1], model.args.vocab_size - 1):  # first token, mid, last, (likely) never
            expected = free[:free.index(eos)] if eos in free else free
            ref = model.generate([p], 30, eos_id=eos)[0]
            out, st = speculative_generate(model, p, 30, eos_id=eos)
            assert ref == expected and out == expected
            assert st["tokens"] == len(expected) + (eos in free)  # the eos itself was decoded


def test_speculative_short_limits():
    model = micro_model(4)
    p = prompts(model.args.vocab_size)[3]
    for max_new in (1, 2, 3, 5):
        assert speculative_generate(model, p, max_new)[0] == model.generate([p], max_new)[0]
    assert speculative_generate(model, p, 0) == ([], {"forwards": 0, "tokens": 0, "mean_accepted": 0.0,
                                                      "accepted_hist": [0, 0, 0, 0]})
    with pytest.raises(ValueError, match="max_seq_len"):
        speculative_generate(model, p, 200)


PERIOD = [3, 7, 4, 9, 12, 5, 8]  # the repeating pattern the micro model learns


@pytest.fixture(scope="module")
def trained_model():
    """A 4-head micro model trained ~100 steps on a repeating pattern: every head knows its token."""
    args = ModelArgs(dim=32, n_layers=5, n_heads=4, vocab_size=16, multiple_of=32, n_future_tokens=4, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    period = torch.tensor(PERIOD)
    for _ in range(100):
        start = torch.randint(0, len(PERIOD), (16,))
        tokens = period[(start[:, None] + torch.arange(32)[None]) % len(PERIOD)]  # (16, 32)
        out = model.forward_backward(tokens, lambda k, ce_k: ce_k[:, :32 - k - 1].mean())
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert out.max() < 0.1, out
    return model.eval()


def test_speculative_accepts_drafts_on_a_trained_model(trained_model):
    model = trained_model
    for p in ([3], [3, 7, 4], [5, 8, 3, 7, 4, 9, 12]):
        ref = model.generate([p], 40)[0]
        out, st = speculative_generate(model, p, 40)
        assert out == ref
        i = PERIOD.index(p[-1])
        assert out[:14] == [PERIOD[(i + 1 + j) % len(PERIOD)] for j in range(14)]  # it learned the pattern
        assert st["mean_accepted"] > 2.5, st  # observed 3.6 of at most 4
        assert st["accepted_hist"][3] > 0
    # eos inside a fully accepted draft block, and as the very first token
    p = [3, 7, 4]
    for eos in (9, 12, 5, 8):
        ref = model.generate([p], 40, eos_id=eos)[0]
        out, st = speculative_generate(model, p, 40, eos_id=eos)
        assert out == ref == [9, 12, 5, 8][:[9, 12, 5, 8].index(eos)]
        assert st["forwards"] <= 2


def test_sample_script_speculative_compare(tmp_path):
    """sample.py --speculative=True runs end to end and reports identical outputs and the stats."""
    sys.path.insert(0, ROOT)
    from tokenizer import train_sentencepiece
    tok_path = train_sentencepiece(["3 7 4 9 12 5 8\n"] * 20, str(tmp_path / "tok"), vocab_size=280)
    from tokenizer import Tokenizer
    n_words = Tokenizer(tok_path).n_words
    model = micro_model(4, vocab_size=n_words)
    args = model.args
    ckpt = {"model": model.state_dict(), "model_args": dataclasses.asdict(args), "stage": "baseline",
            "optimizer": None, "iter": 0, "epoch": 0, "sampler_pos": 0, "rng": [], "best_val_loss": 0.0,
            "config": {}, "data": {"dir": str(tmp_path), "vocab_size": n_words, "tokenizer": tok_path}}
    torch.save(ckpt, tmp_path / "final.pt")
    r = subprocess.run([sys.executable, "sample.py", f"--init_from={tmp_path}", "--speculative=True",
                        "--max_new_tokens=20", "--device=cpu", "--start=3 7 4"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "identical outputs: 1/1" in r.stdout and "speed-up" in r.stdout and "tokens/forward" in r.stdout
