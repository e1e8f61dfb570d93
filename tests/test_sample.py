"""Self-speculative decoding (sample.speculative_generate) against plain greedy decoding
(model.generate): token-for-token equal on random-weight micro models and on a micro model
trained until its heads agree (where drafts must actually be accepted), eos included. sample.py
clips generation to the model's context and reports the speed-up as a median of repeats."""

import dataclasses
import os
import re
import statistics
import subprocess
import sys

import pytest
import torch

from model import ModelArgs, Transformer
from sample import clip_to_context, speculative_generate, time_decoding

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


def test_clip_to_context():
    model = micro_model(4)  # max_seq_len 64: a RoPE table of 128 positions
    assert model.rope.shape[0] == 128
    assert clip_to_context(model, 10, 5) == 5
    assert clip_to_context(model, 10, 500) == 118
    assert clip_to_context(model, 127, 500) == 1
    with pytest.raises(ValueError, match="no room in the model's context of 128 positions"):
        clip_to_context(model, 128, 1)
    p = prompts(model.args.vocab_size)[4]
    assert len(model.generate([p], clip_to_context(model, len(p), 500))[0]) == 128 - len(p)  # fits exactly


def test_time_decoding_reports_median_and_spread():
    """The numbers' structure, not their values: one entry per repeat, speed-up = plain / speculative
    per repeat, and the median between the min and the max."""
    model = micro_model(4)
    ps = prompts(model.args.vocab_size, n=2)
    t = time_decoding(model, ps, [6, 6], repeats=3)
    assert t["repeats"] == 3 and len(t["spec_s"]) == len(t["plain_s"]) == len(t["speedup"]) == 3
    assert all(x > 0 for x in t["spec_s"] + t["plain_s"])
    assert t["speedup"] == [p / s for p, s in zip(t["plain_s"], t["spec_s"])]
    assert t["speedup_median"] == statistics.median(t["speedup"])
    assert t["speedup_min"] == min(t["speedup"]) <= t["speedup_median"] <= t["speedup_max"] == max(t["speedup"])
    alone = time_decoding(model, ps, [6, 6], repeats=2, plain=False)
    assert len(alone["spec_s"]) == 2 and alone["plain_s"] is None and alone["speedup_median"] is None


def save_micro_checkpoint(tmp_path):
    """A micro 4-head checkpoint (max_seq_len 64: 128 positions) with its own sentencepiece tokenizer."""
    from tokenizer import Tokenizer, train_sentencepiece
    tok_path = train_sentencepiece(["3 7 4 9 12 5 8\n"] * 20, str(tmp_path / "tok"), vocab_size=280)
    n_words = Tokenizer(tok_path).n_words
    model = micro_model(4, vocab_size=n_words)
    ckpt = {"model": model.state_dict(), "model_args": dataclasses.asdict(model.args), "stage": "baseline",
            "optimizer": None, "iter": 0, "epoch": 0, "sampler_pos": 0, "rng": [], "best_val_loss": 0.0,
            "config": {}, "data": {"dir": str(tmp_path), "vocab_size": n_words, "tokenizer": tok_path}}
    torch.save(ckpt, tmp_path / "final.pt")


def run_sample(*args):
    return subprocess.run([sys.executable, "sample.py", *args, "--device=cpu"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)


def test_sample_script_speculative_compare(tmp_path):
    """sample.py --speculative=True runs end to end, reports identical outputs, the stats and the
    speed-up as a median of the repeats with its min and max."""
    save_micro_checkpoint(tmp_path)
    r = run_sample(f"--init_from={tmp_path}", "--speculative=True", "--max_new_tokens=20", "--start=3 7 4",
                   "--repeats=3")
    assert r.returncode == 0, r.stderr
    assert "identical outputs: 1/1" in r.stdout and "tokens/forward" in r.stdout and "clipped" not in r.stdout
    m = re.search(r"speed-up (\d+\.\d\d)x \(median of 3 repeats; min (\d+\.\d\d)x, max (\d+\.\d\d)x\)", r.stdout)
    assert m, r.stdout
    median, lo, hi = map(float, m.groups())
    assert lo <= median <= hi
    assert re.search(r"time: speculative \d+\.\d+ s, plain greedy \d+\.\d+ s per pass", r.stdout)


def test_sample_script_clips_to_the_context(tmp_path):
    """max_new_tokens past the model's 128 positions: generation stops there, with one note for all
    prompts, plain sampling and speculative decoding alike."""
    save_micro_checkpoint(tmp_path)
    (tmp_path / "prompts.txt").write_text("3 7 4\n9 12 5 8 3 7 4\n")
    r = run_sample(f"--init_from={tmp_path}", f"--start=FILE:{tmp_path / 'prompts.txt'}", "--max_new_tokens=1000",
                   "--num_samples=2", "--temperature=1.0")
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stdout.splitlines() if "clipped" in line]
    assert notes == ["note: max_new_tokens=1000 clipped to fit the model's context: prompt + new tokens <= 128 "
                     "positions (2 * max_seq_len)"]
    assert r.stdout.count("---------- sample") == 4
    r = run_sample(f"--init_from={tmp_path}", "--start=3 7 4", "--max_new_tokens=1000", "--speculative=True",
                   "--repeats=1")
    assert r.returncode == 0, r.stderr
    assert sum("clipped" in line for line in r.stdout.splitlines()) == 1
    assert "identical outputs: 1/1" in r.stdout
