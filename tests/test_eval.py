"""eval.py: the pass@k estimator against hand-computed values, the verifier on decoded text, the
numbers of evaluate() pinned with a model that replays the dataset's own candidates, and the
script end to end on a micro checkpoint (eval.json, error exits)."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eval import check_vocab, evaluate, pass_at_k, summary_table
from model import ModelArgs, Transformer
from tokenizer import Tokenizer
from weighting import auc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread is fastest on a busy 2-core box
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# -----------------------------------------------------------------------------
# pass@k


def test_pass_at_k_hand_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2) = 0.7
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c = 2 < k: every 3-subset holds a correct one
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(8, 1, 8) == 1.0
    assert pass_at_k(10, 1, 4) == pytest.approx(0.4)  # 1 - C(9,4)/C(10,4) = 1 - 126/210


def test_pass_at_k_matches_binomials():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    # large n: the product form stays finite where the binomials would overflow a float
    assert 0.0 < pass_at_k(2000, 3, 100) < 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 2, 5)


# -----------------------------------------------------------------------------
# a tiny arith dataset and micro checkpoints


@pytest.fixture(scope="module")
def arith_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("arith")
    r = subprocess.run([sys.executable, "data/arith/prepare.py", f"--out_dir={out}", "--n_train_problems=12",
                        "--n_val_problems=4", "--n_test_problems=6"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return str(out)


def read_rows(data_dir, split):
    with open(os.path.join(data_dir, f"{split}.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def micro_args(vocab_size, n_future_tokens=2):
    return ModelArgs(dim=48, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=32,
                     n_future_tokens=n_future_tokens, max_seq_len=128)


def save_checkpoint(path, model, data_dir, stage="critic", data_vocab=None):
    tok = os.path.join(data_dir, "tokenizer.model")
    ckpt = {"model": model.state_dict(), "model_args": dataclasses.asdict(model.args), "stage": stage,
            "optimizer": None, "iter": 7, "epoch": 0, "sampler_pos": 0, "rng": [], "best_val_loss": 1.0,
            "config": {}, "data": {"dir": data_dir, "vocab_size": data_vocab or Tokenizer(tok).n_words,
                                   "tokenizer": tok}}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(ckpt, path)


def test_verifier_on_decoded_tokens(arith_dir):
    """What eval.py verifies is decode(generated ids); the arith tokenizer round-trips exactly."""
    from data.arith.verify import verify
    tok = Tokenizer(os.path.join(arith_dir, "tokenizer.model"))
    rows = read_rows(arith_dir, "test")
    for row in rows:
        ids = tok.encode(row["completion"], bos=False, eos=True)[:-1]  # generate() returns ids cut before eos
        assert tok.decode(ids) == row["completion"]
        assert verify(row["prompt"], tok.decode(ids)) == row["is_correct"]
    row = next(r for r in rows if r["is_correct"])
    answer = row["completion"].splitlines()[-1]
    wrong = row["completion"].replace(answer, f"Answer: {int(answer.split()[-1]) + 1}")
    assert not verify(row["prompt"], tok.decode(tok.encode(wrong)))
    assert not verify(row["prompt"], tok.decode(tok.encode(row["completion"] + "\n= 3")))  # no final Answer line
    assert not verify(row["prompt"], "")


class ReplayModel(Transformer):
    """A micro Transformer whose generate() replays the split's candidates: greedy gives the problem's
    first correct candidate (else its first one), sampling cycles through all its candidates."""

    def set_replay(self, tok, rows):
        self.table = {}
        for r in rows:
            key = tuple(tok.encode(r["prompt"], bos=True, eos=False))
            self.table.setdefault(key, []).append((tok.encode(r["completion"]), r["is_correct"]))
        self.drawn = {k: 0 for k in self.table}

    def generate(self, prompts, max_new_tokens, temperature=0.0, top_k=None, eos_id=None, generator=None):
        out = []
        for p in prompts:
            cands = self.table[tuple(p)]
            if temperature == 0:
                out.append(next((c for c, ok in cands if ok), cands[0][0]))
            else:
                out.append(cands[self.drawn[tuple(p)] % len(cands)][0])
                self.drawn[tuple(p)] += 1
        return out


def test_evaluate_numbers(arith_dir):
    tok = Tokenizer(os.path.join(arith_dir, "tokenizer.model"))
    rows = read_rows(arith_dir, "test")
    torch.manual_seed(0)
    model = ReplayModel(micro_args(tok.n_words, n_future_tokens=3), value_head=True).eval()
    model.set_replay(tok, rows)
    by_problem = {}
    for r in rows:
        by_problem.setdefault(r["problem_id"], []).append(r["is_correct"])
    n_cand = len(rows) // len(by_problem)
    assert all(len(v) == n_cand for v in by_problem.values())

    m = evaluate(model, tok, arith_dir, "test", batch_size=5, num_samples=n_cand, pass_k=[1, 2, n_cand, 99],
                 log_interval=0)
    c = [sum(v) for v in by_problem.values()]  # correct candidates per problem
    assert m["counts"]["problems"] == len(by_problem) and m["counts"]["samples"] == len(rows)
    assert m["pass@1_greedy"] == pytest.approx(np.mean([ci > 0 for ci in c]))
    assert m["pass@1_sampled"] == pytest.approx(sum(c) / len(rows))
    for k in (1, 2, n_cand):
        exact = np.mean([1 - math.comb(n_cand - ci, k) / math.comb(n_cand, k) for ci in c])
        assert m["pass@k"][str(k)] == pytest.approx(exact)
    assert "99" not in m["pass@k"] and any("pass@99" in note for note in m["notes"])
    assert m["counts"]["verifier_errors"] == 0
    # per problem, for paired comparisons: the sampled correct count and the greedy verdict
    assert list(m["per_problem"]) == list(by_problem)
    assert [r["sampled_correct"] for r in m["per_problem"].values()] == c
    assert sum(r["greedy"] for r in m["per_problem"].values()) == m["counts"]["greedy_correct"]
    assert all(r["samples"] == n_cand for r in m["per_problem"].values())

    # per-head loss and accuracy, and the value head, recomputed row by row with the plain forward
    idx = np.load(os.path.join(arith_dir, "test.idx.npy"))
    data = np.fromfile(os.path.join(arith_dir, "test.bin"), dtype=np.uint16).astype(np.int64)
    n = model.n_future_tokens
    first_error = np.load(os.path.join(arith_dir, "test.first_error.npy"))
    ce, hits, count, values, token_v, on_track = np.zeros(n), np.zeros(n), np.zeros(n), [], [], []
    with torch.no_grad():
        for (offset, prompt_len, length, label, _), fe in zip(idx, first_error):
            tokens = torch.from_numpy(data[offset:offset + length])[None]  # (1, L)
            logits = model(tokens, return_all_heads=True)[0]  # (L, n, V)
            for k in range(n):
                # the positions whose head-k target (t + k + 1) is a completion token
                t = torch.arange(prompt_len - k - 1, length - k - 1)
                target = tokens[0, t + k + 1]
                ce[k] += F.cross_entropy(logits[t, k], target, reduction="sum").item()
                hits[k] += (logits[t, k].argmax(-1) == target).sum().item()
                count[k] += len(t)
            v = model.value(model.trunk_forward(tokens))[0]  # (L,)
            values.append(v[length - 1].item())
            for t in range(prompt_len - 1, length):  # the value positions: is the prefix up to t still right?
                token_v.append(v[t].item())
                on_track.append(float(fe < 0 or t < fe))
    assert m["counts"]["val_head_targets"] == [int(x) for x in count]
    assert count[0] == (idx[:, 2] - idx[:, 1]).sum()  # every completion token, eos included
    np.testing.assert_allclose(m["val_head_loss"], ce / count, rtol=1e-5)
    np.testing.assert_allclose(m["val_head_acc"], hits / count, rtol=1e-6)
    assert m["val_loss"] == pytest.approx(np.mean(ce / count), rel=1e-5)
    labels = idx[:, 3].astype(float)
    assert m["value_auc"] == pytest.approx(auc(torch.tensor(values), torch.tensor(labels)), abs=1e-6)
    assert m["value_acc"] == pytest.approx(np.mean((np.array(values) >= 0.5) == (labels > 0.5)))
    assert m["counts"]["value_rows"] == len(rows) and m["counts"]["value_positive"] == int(labels.sum())
    assert 0 < sum(on_track) < len(on_track)
    assert m["value_token_auc"] == pytest.approx(auc(torch.tensor(token_v), torch.tensor(on_track)), abs=1e-6)

    # n_problems: the first problems, for generation and token data alike
    model.set_replay(tok, rows)
    m2 = evaluate(model, tok, arith_dir, "test", n_problems=2, batch_size=4, num_samples=2, pass_k=[1, 2],
                  log_interval=0)
    assert m2["counts"]["problems"] == 2 and m2["counts"]["samples"] == 4
    assert m2["counts"]["val_rows"] == 2 * n_cand


def test_evaluate_clips_generation_to_the_context(arith_dir):
    """max_new_tokens past the model's context (2 * max_seq_len positions): every prompt generates up
    to the same clipped limit (the longest prompt's room), with one note, instead of a crash."""
    tok = Tokenizer(os.path.join(arith_dir, "tokenizer.model"))
    prompts = [tok.encode(r["prompt"], bos=True, eos=False) for r in read_rows(arith_dir, "test")]
    longest = max(map(len, prompts))
    args = dataclasses.replace(micro_args(tok.n_words), max_seq_len=longest)  # room for `longest` new tokens
    torch.manual_seed(0)
    model = Transformer(args).eval()
    limits = []
    generate = model.generate
    model.generate = lambda chunk, limit, **kw: limits.append(limit) or generate(chunk, limit, **kw)
    m = evaluate(model, tok, arith_dir, "test", n_problems=3, batch_size=2, max_new_tokens=10_000, num_samples=2,
                 pass_k=[1], log_interval=0)
    assert set(limits) == {longest} and len(limits) == 2 + 3  # greedy: 2 batches, sampled: 3
    notes = [n for n in m["notes"] if "clipped" in n]
    assert notes == [f"max_new_tokens=10000 clipped to {longest}: the longest prompt ({longest} tokens) + new tokens "
                     f"must fit the model's context of {2 * longest} positions (2 * max_seq_len)"]
    assert m["counts"]["greedy_hit_max_new_tokens"] <= 3 and m["counts"]["samples"] == 6


def test_summary_table_labels():
    """pass@1 sampled once (pass@k's k=1 is the same number), the losses named by the evaluated split."""
    m = {"pass@1_greedy": 0.5, "pass@1_sampled": 0.25, "pass@k": {"1": 0.25, "4": 0.75}, "val_loss": 1.5,
         "val_head_loss": [1.0, 2.0], "val_head_acc": [0.5, 0.25], "value_acc": None, "value_auc": None,
         "notes": ["a note"], "counts": {"problems": 4, "greedy_correct": 2, "samples": 16, "sampled_correct": 4}}
    text = summary_table(m, "title", split="test")
    labels = [line[:28].strip() for line in text.splitlines()[2:]]
    assert labels == ["pass@1 greedy", "pass@1 sampled", "pass@4 sampled", "test loss (mean of heads)",
                      "test loss per head", "test top-1 acc per head", "note: a note"]
    assert "val loss" not in text and "val top-1" not in text and "pass@1 sampled".ljust(28) + " 0.2500  (4/16)" in text


def run_eval(*args, timeout=120):
    return subprocess.run([sys.executable, "eval.py", *args, "--device=cpu"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def test_eval_script_writes_eval_json(arith_dir, tmp_path):
    tok = Tokenizer(os.path.join(arith_dir, "tokenizer.model"))
    torch.manual_seed(0)
    model = Transformer(micro_args(tok.n_words), value_head=True)
    run_dir = tmp_path / "run"
    save_checkpoint(str(run_dir / "best.pt"), model, arith_dir)
    r = run_eval(f"--init_from={run_dir}", f"--data_dir={arith_dir}", "--n_problems=3", "--num_samples=4",
                 "--pass_k=[1,2,4,8]", "--max_new_tokens=24", "--batch_size=4", "--log_interval=1")
    assert r.returncode == 0, r.stderr
    assert "eval greedy: batch 1/1" in r.stderr and "pass@1 greedy" in r.stdout
    assert r.stdout.count("pass@1 sampled") == 1 and "test loss (mean of heads)" in r.stdout
    with open(run_dir / "eval.json") as f:  # default: next to the checkpoint
        e = json.load(f)
    assert e["checkpoint"] == str(run_dir / "best.pt") and e["stage"] == "critic" and e["iter"] == 7
    assert e["split"] == "test" and e["settings"]["num_samples"] == 4 and e["settings"]["n_problems"] == 3
    c = e["counts"]
    assert c["problems"] == 3 and c["samples"] == 12
    assert 0 <= c["greedy_correct"] <= 3 and 0 <= c["sampled_correct"] <= 12
    assert 0 <= c["greedy_hit_max_new_tokens"] <= 3 and 0 <= c["sampled_hit_max_new_tokens"] <= 12
    assert e["pass@1_greedy"] == c["greedy_correct"] / 3 and e["pass@1_sampled"] == c["sampled_correct"] / 12
    assert set(e["pass@k"]) == {"1", "2", "4"} and any("pass@8" in note for note in e["notes"])
    assert all(0.0 <= v <= 1.0 for v in e["pass@k"].values())
    assert len(e["val_head_loss"]) == len(e["val_head_acc"]) == len(c["val_head_targets"]) == 2
    # a random micro model: about log(V) nats per token, and little better than chance at top-1
    assert all(0.5 * math.log(tok.n_words) < x < 2 * math.log(tok.n_words) for x in e["val_head_loss"])
    assert all(0.0 <= x <= 1.0 for x in e["val_head_acc"])
    assert 0.0 <= e["value_acc"] <= 1.0 and (e["value_auc"] is None or 0.0 <= e["value_auc"] <= 1.0)
    assert c["value_rows"] == c["val_rows"] > 0
    assert len(e["examples"]) == 3 and e["examples"][0]["prompt"].startswith("Compute:")
    assert not [p for p in os.listdir(run_dir) if ".tmp" in p]  # the temp file was renamed


@pytest.mark.slow
def test_eval_script_errors(arith_dir, tmp_path):
    tok = Tokenizer(os.path.join(arith_dir, "tokenizer.model"))
    small = Transformer(micro_args(tok.n_words - 8))  # a model that cannot hold the data's ids
    save_checkpoint(str(tmp_path / "small.pt"), small, arith_dir, data_vocab=tok.n_words - 8)
    r = run_eval(f"--init_from={tmp_path / 'small.pt'}", f"--data_dir={arith_dir}")
    assert r.returncode == 2 and r.stderr.startswith("eval.py: error:") and len(r.stderr.strip().splitlines()) == 1
    assert "vocab_size" in r.stderr

    r = run_eval(f"--init_from={tmp_path / 'missing'}", f"--data_dir={arith_dir}")
    assert r.returncode == 2 and r.stderr.startswith("eval.py: error:") and "missing" in r.stderr

    # prompts longer than the model's whole context (2 * 4 positions): nothing to clip to
    short = Transformer(dataclasses.replace(micro_args(tok.n_words), max_seq_len=4))
    save_checkpoint(str(tmp_path / "short.pt"), short, arith_dir)
    r = run_eval(f"--init_from={tmp_path / 'short.pt'}", f"--data_dir={arith_dir}", "--n_problems=2")
    assert r.returncode == 2 and r.stderr.startswith("eval.py: error:") and len(r.stderr.strip().splitlines()) == 1
    assert "no room in the model's context of 8 positions" in r.stderr

    # a checkpoint trained on another dataset's vocabulary (its model would hold our ids)
    from data.loader import load_meta
    other = Transformer(micro_args(tok.n_words + 100))
    with pytest.raises(ValueError, match="vocab_size"):
        check_vocab(other, tok, load_meta(arith_dir), {"vocab_size": tok.n_words + 100, "dir": "data/other"})
    check_vocab(other, tok, load_meta(arith_dir), {"vocab_size": tok.n_words})


def test_damaged_split_is_one_line_with_file_and_line(arith_dir, tmp_path, run_main):
    """A {split}.jsonl with a truncated line or a row without `prompt` is checked as data
    preparation checks rows (data/format.py): one line naming the file and the line, exit 2, before
    any generation."""
    import shutil
    tok = Tokenizer(os.path.join(arith_dir, "tokenizer.model"))
    save_checkpoint(str(tmp_path / "m.pt"), Transformer(micro_args(tok.n_words)), arith_dir)
    data = tmp_path / "data"
    shutil.copytree(arith_dir, data)
    path = data / "test.jsonl"
    lines = path.read_text().splitlines()
    no_prompt = {k: v for k, v in json.loads(lines[1]).items() if k != "prompt"}
    for damaged, where in [(lines[:-1] + [lines[-1][:25]], f"{path}:{len(lines)}: malformed JSON"),
                           ([lines[0], json.dumps(no_prompt)] + lines[2:], f"{path}:2: missing field 'prompt'")]:
        path.write_text("\n".join(damaged) + "\n")
        code, out, err = run_main("eval.py", f"--init_from={tmp_path / 'm.pt'}", f"--data_dir={data}", "--device=cpu",
                                  f"--out={tmp_path / 'eval.json'}")
        assert (code, err.count("\n")) == (2, 1), err
        assert err.startswith(f"eval.py: error: {where}"), err
        assert not (tmp_path / "eval.json").exists()
