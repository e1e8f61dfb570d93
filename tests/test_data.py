"""data/: the arith verifier and generator, the token format, TokenDataset's sampling and
truncation, collate's loss mask, the resumable distributed sampler, the CodeContests converter,
and one-line errors (file and line/field, exit code != 0, no partial output) for bad inputs."""

import base64
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from data.arith import prepare as arith
from data.arith.verify import evaluate, extract_answer, first_error, parse_expression, verify
from data.format import check_row, write_dataset
from data.loader import ResumableSampler, TokenDataset, check_tokenizer, collate, load_meta, make_loader
from tokenizer import Tokenizer, train_sentencepiece

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--n_train_problems=120", "--n_val_problems=25", "--n_test_problems=25"]


def run(script, *args):
    """Run a repo script as the user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def files_in(path):
    return sorted(os.listdir(path)) if os.path.exists(path) else []


@pytest.fixture(scope="module")
def arith_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("arith"))
    result = run("data/arith/prepare.py", f"--out_dir={out}", *SMALL)
    assert result.returncode == 0, result.stderr
    assert "train:" in result.stdout and "correct" in result.stdout
    return out


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A tiny sentencepiece model with byte fallback, for the converters."""
    texts = ["def main():\n    n = int(input())\n    print(n * 2)\n", "You are given an integer n. Print 2n.",
             "import sys\nfor line in sys.stdin:\n    print(line.strip()[::-1])\n"] * 10
    return train_sentencepiece(texts, str(tmp_path_factory.mktemp("sp") / "tok"), vocab_size=320)


def write_tiktoken_file(path):
    tokens = [bytes([i]) for i in range(256)] + [b"  ", b"in", b"ing"]
    with open(path, "wb") as f:
        for rank, token in enumerate(tokens):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    return str(path)


# -----------------------------------------------------------------------------
# the verifier


def test_verify_hand_written_cases():
    prompt = "Compute: 3 + 4 * (12 - 5)\n"
    correct = "= 3 + 4 * 7\n= 3 + 28\n= 31\nAnswer: 31"
    assert verify(prompt, correct)
    assert verify(prompt, "Answer: 31") and verify(prompt, correct + "\n\n")
    slips = {
        "value": "= 3 + 4 * 8\n= 3 + 32\n= 35\nAnswer: 35",
        "operator": "= 3 + 4 * 7\n= 3 + 11\n= 14\nAnswer: 14",
        "drop_term": "= 3 + 4 * 7\n= 4 * 7\n= 28\nAnswer: 28",
        "precedence": "= 3 + 4 * 7\n= 7 * 7\n= 49\nAnswer: 49",
        "carry": "= 3 + 4 * 7\n= 3 + 28\n= 21\nAnswer: 21",
    }
    for kind, completion in slips.items():
        assert not verify(prompt, completion), kind
    assert verify("Compute: 5 - 12\n", "= -7\nAnswer: -7")
    assert not verify("Compute: 5 - 12\n", "= 7\nAnswer: 7")  # sign error
    assert verify("Compute: (5 - 12) * 2\n", "= (-7) * 2\n= -14\nAnswer: -14")
    unparsable = ["", "31", "Answer:", "Answer: abc", "Answer: 31 apples", "answer: 31", "Answer: 31\n= 31",
                  "Answer: 3.1e1", "Answer: " + "9" * 5000]
    for completion in unparsable:
        assert not verify(prompt, completion), completion
    assert extract_answer(correct) == "31" and extract_answer("= 1\nAnswer: -7 ") == "-7"
    assert extract_answer("Answer: 31\nmore") is None
    with pytest.raises(ValueError):
        verify("What is 3 + 4?", "Answer: 7")


def test_first_error_hand_written_cases():
    """The character offset of the first wrong line (None when every line is right)."""
    p = "Compute: 3 + 4 * (12 - 5)\n"  # = 31
    right = "= 3 + 4 * 7\n= 3 + 28\n= 31\nAnswer: 31"
    assert first_error(p, right) is None and verify(p, right)
    assert first_error(p, "= 7 * 7\n= 49\nAnswer: 49") == 0  # wrong first line (precedence ignored)
    wrong_answer = "= 3 + 4 * 7\n= 3 + 28\n= 31\nAnswer: 32"
    assert first_error(p, wrong_answer) == wrong_answer.index("Answer")  # only the answer is wrong
    slip = "= 3 + 4 * 7\n= 3 + 29\n= 31\nAnswer: 31"  # a slip that lands on the right answer
    assert verify(p, slip) and first_error(p, slip) == slip.index("= 3 + 29")
    garbled = "= 3 + 4 * 7\n= 3 + 2x8\n= 31\nAnswer: 31"
    assert first_error(p, garbled) == garbled.index("= 3 + 2x8")  # a line that does not parse
    assert first_error(p, "= 3 + 4 * 7\nthe answer is 31") == len("= 3 + 4 * 7\n")
    unfinished = "= 3 + 4 * 7\n= 3 + 28"
    assert first_error(p, unfinished) == len(unfinished)  # never answers: wrong where it ends (the eos)
    assert first_error(p, right + "\n= 31") == len(right) + 1  # anything after the answer is wrong
    assert first_error("Compute: 2 - 5\n", "= -3\nAnswer: -3") is None  # negative values


def test_parse_expression():
    assert parse_expression("3 + 4 * (12 - 5)") == ("+", 3, ("*", 4, ("-", 12, 5)))
    assert parse_expression("3 + 4 * 7", flat=True) == ("*", ("+", 3, 4), 7)
    assert parse_expression("(-7) * 2 - -3") == ("-", ("*", -7, 2), -3)
    assert evaluate(parse_expression("10 - 2 - 3")) == 5  # left associative
    for bad in ["3 +", "3 4", "(3 + 4", "3 / 4", "- (3)"]:
        with pytest.raises(ValueError):
            parse_expression(bad)


def test_render_round_trips():
    rng = random.Random(0)
    for _ in range(300):
        tree = arith.random_tree(rng.randint(1, 5), rng, 20)
        assert parse_expression(arith.render(tree)) == tree
        for state in arith.solve(tree):
            assert parse_expression(arith.render(state)) == state


def line_values(completion, flat=False):
    """Exact value of every `= ...` line of a completion."""
    return [evaluate(parse_expression(line[2:], flat=flat)) for line in completion.splitlines()[:-1]]


def test_slips_sit_at_one_step_and_carry_forward():
    """A random slip changes the running value at exactly one step; every later step is a correct
    rewrite of the line before (the same value). Systematic slips are consistent in their own rule."""
    rng = random.Random(1)
    seen, n_systematic, n_wrong = set(), 0, 0
    for _ in range(300):
        tree = arith.random_tree(rng.randint(2, 4), rng, 20)
        truth = evaluate(tree)
        correct = arith.solution_text(arith.solve(tree))
        assert line_values(correct) == [truth] * arith.n_ops(tree)
        for kind in arith.RANDOM_SLIPS:
            text = arith.try_slip(kind, tree, rng, correct)
            if text is None:
                continue
            seen.add(kind)
            values = [truth] + line_values(text)
            changes = [i for i in range(1, len(values)) if values[i] != values[i - 1]]
            assert len(changes) <= 1, (kind, text)  # 0 only when a slip cancels out
            assert extract_answer(text) == str(values[-1])
        text = arith.try_slip("precedence", tree, rng, correct)
        if text is not None:  # left to right all along: every line keeps the flat value of the problem
            seen.add("precedence")
            flat_truth = evaluate(parse_expression(arith.render(tree), flat=True))
            assert line_values(text, flat=True) == [flat_truth] * len(text.splitlines()[:-1])
        for kind in ("carry", "sign"):
            text = arith.try_slip(kind, tree, rng, correct)
            if text is not None:
                seen.add(kind)
                n_systematic += 1
                n_wrong += extract_answer(text) != str(truth)  # right only when the slips cancel out
                if kind == "sign":  # no negative number anywhere
                    assert "(-" not in text and "= -" not in text and "Answer: -" not in text
    assert seen == set(arith.RANDOM_SLIPS + arith.SYSTEMATIC_SLIPS)
    assert n_wrong > 0.95 * n_systematic
    assert arith.add_without_carry(28, 15) == 33 and arith.add_without_carry(95, 7) == 92
    assert arith.add_without_carry(8, 156) == 154


def test_generated_data(arith_dir):
    meta = load_meta(arith_dir)
    assert meta["verifier"] == "arith" and meta["tokenizer_kind"] == "sentencepiece"
    assert meta["tokenizer"] == os.path.join(arith_dir, "tokenizer.model")  # stored relative to the data dir
    assert json.load(open(os.path.join(arith_dir, "meta.json")))["tokenizer"] == "tokenizer.model"
    tok = Tokenizer(meta["tokenizer"])
    check_tokenizer(meta, tok)
    assert tok.n_words <= 128
    prompts = {}
    for split in ("train", "val", "test"):
        rows = read_jsonl(os.path.join(arith_dir, f"{split}.jsonl"))
        idx = np.load(os.path.join(arith_dir, f"{split}.idx.npy"))
        tokens = np.memmap(os.path.join(arith_dir, f"{split}.bin"), dtype=meta["dtype"], mode="r")
        assert len(rows) == len(idx) == meta["splits"][split] == 4 * {"train": 120}.get(split, 25)
        # every label is the verifier's, and both labels are present
        assert all(row["is_correct"] == verify(row["prompt"], row["completion"]) for row in rows)
        assert {row["is_correct"] for row in rows} == {True, False}
        assert list(idx[:, 3]) == [int(row["is_correct"]) for row in rows]
        # the token layout: [bos] prompt completion [eos], offsets contiguous
        assert list(idx[:, 0]) == [0] + list(np.cumsum(idx[:-1, 2]))
        for row, (offset, prompt_len, length, label, problem) in zip(rows, idx):
            seq = [int(t) for t in tokens[offset:offset + length]]
            assert seq[0] == tok.bos_id and seq[-1] == tok.eos_id
            assert tok.decode(seq[:prompt_len]) == row["prompt"]
            assert tok.decode(seq[prompt_len:]) == row["completion"]
            assert meta["problems"][split][problem] == row["problem_id"]
        assert max(idx[:, 2]) < 128
        prompts[split] = {row["prompt"] for row in rows}
        assert len(prompts[split]) == len(meta["problems"][split])
    # problems are disjoint across splits (by expression and by id)
    assert not (prompts["train"] & prompts["val"]) and not (prompts["train"] & prompts["test"])
    assert not (prompts["val"] & prompts["test"])
    assert not set(meta["problems"]["train"]) & set(meta["problems"]["test"])
    train = read_jsonl(os.path.join(arith_dir, "train.jsonl"))
    assert {row["slip"] for row in train} == {None, *arith.RANDOM_SLIPS, *arith.SYSTEMATIC_SLIPS}
    assert not any(name.startswith(".") for name in os.listdir(arith_dir))  # no temp files left


def test_arith_deterministic_by_seed(arith_dir, tmp_path):
    again, other = str(tmp_path / "again"), str(tmp_path / "other")
    assert run("data/arith/prepare.py", f"--out_dir={again}", *SMALL).returncode == 0
    assert files_in(again) == files_in(arith_dir)
    for name in files_in(again):
        with open(os.path.join(again, name), "rb") as f, open(os.path.join(arith_dir, name), "rb") as g:
            assert f.read() == g.read(), name
    assert run("data/arith/prepare.py", f"--out_dir={other}", "--seed=7", *SMALL).returncode == 0
    for name in ("train.jsonl", "test.jsonl", "train.bin"):
        assert open(os.path.join(other, name), "rb").read() != open(os.path.join(arith_dir, name), "rb").read()


def test_arith_with_given_tiktoken_tokenizer(tmp_path):
    tok_path = write_tiktoken_file(tmp_path / "tokenizer.model")
    out = str(tmp_path / "out")
    result = run("data/arith/prepare.py", f"--out_dir={out}", f"--tokenizer={tok_path}", "--n_train_problems=10",
                 "--n_val_problems=3", "--n_test_problems=3")
    assert result.returncode == 0, result.stderr
    meta = load_meta(out)
    assert meta["tokenizer_kind"] == "tiktoken" and meta["tokenizer"] == os.path.abspath(tok_path)
    assert meta["vocab_size"] == 259 + 256 and meta["bos_id"] == 259 and meta["pad_id"] == 263
    assert "tokenizer.model" not in files_in(out)
    ds = TokenDataset(out, "val")
    assert ds[0]["tokens"][0] == 259


def test_arith_bad_options(tmp_path):
    out = str(tmp_path / "out")
    for args in (["--no_such_option=1"], ["--seed=abc"], ["seed=1"], ["--min_ops=3", "--max_ops=2"],
                 ["--slip_ratio=1.5"]):
        result = run("data/arith/prepare.py", f"--out_dir={out}", *args)
        assert result.returncode == 2, args
        assert result.stderr.startswith("prepare.py: error: ") and result.stderr.count("\n") == 1, result.stderr
    # too few distinct problems exist for the request: one line, exit 1, nothing written
    result = run("data/arith/prepare.py", f"--out_dir={out}", "--min_ops=1", "--max_ops=1", "--max_operand=2",
                 "--n_train_problems=50")
    assert result.returncode == 1 and "found only" in result.stderr and result.stderr.count("\n") == 1
    assert files_in(out) == []


# -----------------------------------------------------------------------------
# TokenDataset, collate, sampler


def test_sampling_options(arith_dir):
    full = TokenDataset(arith_dir, "train")
    labels = full.idx[:, 3]
    n_correct, n_all = int(labels.sum()), len(labels)
    assert len(full) == n_all and list(full.rows) == list(range(n_all))

    ds = TokenDataset(arith_dir, "train", n_samples=100, seed=3)
    assert len(ds) == 100 and len(set(ds.rows)) == 100
    assert list(ds.rows) == list(TokenDataset(arith_dir, "train", n_samples=100, seed=3).rows)  # deterministic
    assert list(ds.rows) != list(TokenDataset(arith_dir, "train", n_samples=100, seed=4).rows)

    ds = TokenDataset(arith_dir, "train", n_samples=80, balance_correct=True, correct_ratio=0.25, seed=0)
    assert len(ds) == 80 and int(labels[ds.rows].sum()) == 20 and len(set(ds.rows)) == 80
    ds = TokenDataset(arith_dir, "train", balance_correct=True)  # as many as possible without repeats, 50/50
    expected = 2 * min(n_correct, n_all - n_correct)
    assert len(ds) == expected and int(labels[ds.rows].sum()) == expected // 2 and len(set(ds.rows)) == expected
    ds = TokenDataset(arith_dir, "train", balance_correct=True, correct_ratio=1.0)  # correct-only (the oracle)
    assert len(ds) == n_correct and labels[ds.rows].all()
    ds = TokenDataset(arith_dir, "train", n_samples=3 * n_all, seed=1)  # oversampling repeats every row 3 times
    assert len(ds) == 3 * n_all and np.bincount(ds.rows).tolist() == [3] * n_all
    item = ds[5]
    assert set(item) == {"index", "tokens", "prompt_len", "reward", "problem", "first_error"}
    assert item["index"] == ds.rows[5] and item["tokens"].dtype == np.int64
    assert item["reward"] == float(labels[item["index"]])
    with pytest.raises(ValueError, match="correct_ratio"):
        TokenDataset(arith_dir, "train", balance_correct=True, correct_ratio=1.5)


def test_collate_loss_mask(arith_dir):
    ds = TokenDataset(arith_dir, "val")
    items = [ds[i] for i in (0, 7, 3)]
    batch = collate(items, pad_id=3)
    B, L = batch["input_ids"].shape
    assert (B, L) == (3, max(len(it["tokens"]) for it in items))
    assert batch["input_ids"].dtype == torch.long and batch["loss_mask"].dtype == torch.float32
    for b, item in enumerate(items):
        n, p = len(item["tokens"]), item["prompt_len"]
        expected = torch.tensor([1.0 if p <= t < n else 0.0 for t in range(L)])
        assert torch.equal(batch["loss_mask"][b], expected)
        assert batch["input_ids"][b, :n].tolist() == item["tokens"].tolist()
        assert (batch["input_ids"][b, n:] == 3).all()
        assert batch["lengths"][b] == n and batch["prompt_lens"][b] == p
        assert batch["reward"][b] == item["reward"] and batch["index"][b] == item["index"]


def test_max_length_truncate_and_drop(arith_dir):
    idx = np.load(os.path.join(arith_dir, "train.idx.npy"))
    prompt_len, length = idx[:, 1], idx[:, 2]
    max_length = int(np.median(prompt_len)) + 3  # some prompts alone do not leave room for the completion
    ds = TokenDataset(arith_dir, "train", max_length=max_length)
    over = length > max_length
    no_room = prompt_len >= max_length
    assert ds.n_dropped == int(no_room.sum()) > 0
    assert ds.n_truncated == int((over & ~no_room).sum()) > 0
    assert len(ds) == len(idx) - ds.n_dropped
    full = TokenDataset(arith_dir, "train")
    for i in range(len(ds)):
        item = ds[i]
        assert len(item["tokens"]) <= max_length and item["prompt_len"] < len(item["tokens"])
        whole = full[item["index"]]["tokens"]
        assert item["tokens"].tolist() == whole[:len(item["tokens"])].tolist()  # the completion is cut, prompt kept
    max_length = int(np.median(length))
    over = length > max_length
    ds = TokenDataset(arith_dir, "train", max_length=max_length, overflow="drop")
    assert ds.n_dropped == int(over.sum()) > 0 and ds.n_truncated == 0 and len(ds) == int((~over).sum())
    assert all(len(ds[i]["tokens"]) == length[ds[i]["index"]] for i in range(len(ds)))
    with pytest.raises(ValueError, match="longer than max_length"):
        TokenDataset(arith_dir, "train", max_length=2)


def test_sampler_ranks_epochs_and_resume():
    n, world = 12, 3
    orders = [list(ResumableSampler(range(n), rank=r, world_size=world, shuffle=True, seed=5)) for r in range(world)]
    assert [len(o) for o in orders] == [4, 4, 4]
    assert sorted(sum(orders, [])) == list(range(n))  # disjoint and covering
    # pad=True with a remainder: equal counts, padded by repetition
    padded = [list(ResumableSampler(range(10), rank=r, world_size=world, seed=5)) for r in range(world)]
    assert [len(o) for o in padded] == [4, 4, 4] and set(sum(padded, [])) == set(range(10))
    # it is torch's DistributedSampler: the same order (training), plus skip and pad=False
    assert isinstance(ResumableSampler(range(10)), torch.utils.data.DistributedSampler)
    torch_order = [list(torch.utils.data.DistributedSampler(range(10), num_replicas=world, rank=r, seed=5))
                   for r in range(world)]
    assert padded == torch_order
    # pad=False: rank r reads order[r::world], every sample exactly once
    full = list(ResumableSampler(range(10), shuffle=True, seed=5, pad=False))
    unpadded = [list(ResumableSampler(range(10), rank=r, world_size=world, seed=5, pad=False)) for r in range(world)]
    assert [len(o) for o in unpadded] == [4, 3, 3] and sorted(sum(unpadded, [])) == list(range(10))
    assert unpadded[1] == full[1::world]
    # set_epoch changes the order, deterministically
    s = ResumableSampler(range(100), seed=0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert e0 != e1 and sorted(e0) == sorted(e1) == list(range(100))
    s.set_epoch(0)
    assert list(s) == e0
    assert list(ResumableSampler(range(5), shuffle=False)) == [0, 1, 2, 3, 4]
    # set_skip resumes exactly, for the next iteration only
    s.set_epoch(1)
    s.set_skip(37)
    assert len(s) == 63 and list(s) == e1[37:]
    assert len(s) == 100 and list(s) == e1
    with pytest.raises(ValueError):
        s.set_skip(101)


def test_loader_resume_matches_uninterrupted_run(arith_dir):
    ds = TokenDataset(arith_dir, "train")
    loader, sampler = make_loader(ds, batch_size=16, pad_id=3, shuffle=True, seed=11, rank=1, world_size=2)
    sampler.set_epoch(2)
    batches = [b["index"].tolist() for b in loader]
    assert len(batches) == len(loader) == -(-240 // 16)
    loader, sampler = make_loader(ds, batch_size=16, pad_id=3, shuffle=True, seed=11, rank=1, world_size=2)
    sampler.set_epoch(2)
    sampler.set_skip(5 * 16)  # resume after 5 batches
    assert [b["index"].tolist() for b in loader] == batches[5:]
    # validation: pad=False shards cover every sample once
    seen = []
    for rank in range(3):
        loader, _ = make_loader(ds, batch_size=7, pad_id=3, shuffle=False, seed=0, rank=rank, world_size=3, pad=False)
        seen += [i for b in loader for i in b["index"].tolist()]
    assert sorted(seen) == list(range(len(ds)))


def test_loader_errors(arith_dir, tmp_path, sp_model):
    with pytest.raises(FileNotFoundError, match="meta.json not found"):
        load_meta(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nosplit.idx.npy not found"):
        TokenDataset(arith_dir, "nosplit")
    with pytest.raises(ValueError, match=r"meta.json: field 'vocab_size' is \d+ but tokenizer .* has \d+"):
        check_tokenizer(load_meta(arith_dir), Tokenizer(sp_model))


def test_truncated_token_files_name_the_file(arith_dir, tmp_path):
    """A token file or index cut short (a copy that stopped early) is a one-line error naming the
    file and what is wrong, not numpy's message."""
    import shutil
    d = tmp_path / "cut"
    shutil.copytree(arith_dir, d)
    bin_path, idx_path = d / "val.bin", d / "val.idx.npy"
    data = bin_path.read_bytes()
    bin_path.write_bytes(data[:-1])  # half a uint16 token
    with pytest.raises(ValueError) as e:
        TokenDataset(str(d), "val")
    assert str(e.value) == f"{bin_path}: {len(data) - 1} bytes is not a whole number of uint16 tokens (truncated file?)"
    bin_path.write_bytes(data[:-4])  # two whole tokens short
    with pytest.raises(ValueError) as e:
        TokenDataset(str(d), "val")
    assert str(e.value) == (f"{bin_path}: holds {len(data) // 2 - 2} tokens, fewer than {idx_path} indexes "
                            f"(truncated file?)")
    bin_path.write_bytes(data)
    idx_path.write_bytes(idx_path.read_bytes()[:-7])
    with pytest.raises(ValueError, match=f"^{idx_path}: not a readable index \\(truncated file\\?\\): "):
        TokenDataset(str(d), "val")


# -----------------------------------------------------------------------------
# writing: atomic, and one-line errors for bad raw rows


def good_rows(n, prefix="p"):
    return [{"problem_id": f"{prefix}{i // 2}", "prompt": f"Q{i}: print 2n\n", "completion": f"print({i})\n",
             "is_correct": i % 2 == 0} for i in range(n)]


def write_rows(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")


def test_format_script_and_bad_rows(tmp_path, sp_model):
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    write_rows(raw / "train.jsonl", good_rows(6))
    write_rows(raw / "val.jsonl", good_rows(4, "v"))
    result = run("data/format.py", f"--in_dir={raw}", f"--tokenizer={sp_model}", f"--out_dir={out}")
    assert result.returncode == 0, result.stderr
    assert load_meta(str(out))["splits"] == {"train": 6, "val": 4}
    assert TokenDataset(str(out), "val")[1]["reward"] == 0.0

    bad_cases = [
        ('{"problem_id": "a", "prompt": "x", "completion": "y", "is_correct": true', "train.jsonl:2: malformed JSON"),
        ({"problem_id": "a", "prompt": "x", "completion": "y"}, "train.jsonl:2: missing field 'is_correct'"),
        ({"problem_id": "a", "prompt": "x", "completion": "y", "is_correct": 1},
         "train.jsonl:2: field 'is_correct' must be true or false"),
        ({"problem_id": "a", "prompt": "x", "completion": None, "is_correct": True},
         "train.jsonl:2: field 'completion' must be a string"),
        ({"problem_id": 7, "prompt": "x", "completion": "y", "is_correct": True},
         "train.jsonl:2: field 'problem_id' must be a string"),
        ('["not", "an", "object"]', "train.jsonl:2: expected a JSON object"),
    ]
    for bad, message in bad_cases:
        fresh = tmp_path / "fresh"
        write_rows(raw / "train.jsonl", good_rows(1) + [bad] + good_rows(2))
        result = run("data/format.py", f"--in_dir={raw}", f"--tokenizer={sp_model}", f"--out_dir={fresh}")
        assert result.returncode != 0
        assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert str(raw / "train.jsonl") in result.stderr
        assert files_in(fresh) == []
    write_rows(raw / "train.jsonl", [])
    result = run("data/format.py", f"--in_dir={raw}", f"--tokenizer={sp_model}", f"--out_dir={tmp_path / 'fresh'}")
    assert result.returncode != 0 and "train.jsonl: no rows (empty split)" in result.stderr
    assert files_in(tmp_path / "fresh") == []

    # a second tokenizer into the same dataset: refused, naming meta.json and the field; nothing changes
    before = {name: (out / name).read_bytes() for name in files_in(out)}
    write_rows(raw / "train.jsonl", good_rows(6))
    other = write_tiktoken_file(tmp_path / "other.model")
    result = run("data/format.py", f"--in_dir={raw}", f"--tokenizer={other}", f"--out_dir={out}")
    assert result.returncode != 0
    assert f"{out / 'meta.json'}: field 'vocab_size'" in result.stderr and result.stderr.count("\n") == 1
    assert {name: (out / name).read_bytes() for name in files_in(out)} == before


def test_write_dataset_leaves_nothing_on_error(tmp_path, sp_model):
    tok = Tokenizer(sp_model)

    class Failing:  # a tokenizer that breaks on the 5th row
        kind, n_words, bos_id, eos_id, pad_id = tok.kind, tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id
        calls = 0

        def encode(self, text, bos=False, eos=False):
            Failing.calls += 1
            if Failing.calls > 8:
                raise RuntimeError("disk full")
            return tok.encode(text, bos, eos)
    out = tmp_path / "out"
    meta, _ = write_dataset(str(out), {"train": good_rows(4)}, tok, sp_model)
    before = {name: (out / name).read_bytes() for name in files_in(out)}
    with pytest.raises(RuntimeError):
        write_dataset(str(out), {"train": good_rows(10)}, Failing(), sp_model)
    assert {name: (out / name).read_bytes() for name in files_in(out)} == before  # old dataset intact, no temps
    with pytest.raises(ValueError, match="split 'val' has no rows"):
        write_dataset(str(out), {"val": []}, tok, sp_model)
    with pytest.raises(ValueError, match="train row 0: missing field 'prompt'"):
        write_dataset(str(out), {"train": [{"problem_id": "a", "completion": "b", "is_correct": True}]}, tok, sp_model)
    assert {name: (out / name).read_bytes() for name in files_in(out)} == before
    with pytest.raises(ValueError, match="x.jsonl:3: field 'is_correct' must be true or false"):
        check_row({"problem_id": "a", "prompt": "b", "completion": "c", "is_correct": "yes"}, "x.jsonl:3")


# -----------------------------------------------------------------------------
# CodeContests


def cc_problems():
    py3, cpp, py2 = 3, 2, 1
    return [
        {"name": "1000_A. Double", "description": "Print 2n.",
         "solutions": {"language": [py3, cpp, py3, py3], "solution": ["print(2*int(input()))", "int main(){}",
                                                                      "n = int(input())\r\nprint(n * 2)  \n",
                                                                      "print(2*int(input()))"]},
         "incorrect_solutions": {"language": [py3, py2], "solution": ["print(int(input()))", "print 2"]}},
        {"name": "1000_B. Only C++", "description": "No Python here.",
         "solutions": {"language": [cpp], "solution": ["int main(){}"]},
         "incorrect_solutions": {"language": [], "solution": []}},
        {"name": "1000_C. Reverse", "description": "Reverse each line.",
         "solutions": {"language": [py3], "solution": ["import sys\nfor l in sys.stdin: print(l.strip()[::-1])"]},
         "incorrect_solutions": {"language": [py3, py3, py3], "solution": ["print(input())", "print(1)", "pass"]}},
    ]


def test_codecontests_parquet_and_jsonl(tmp_path, sp_model):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(cc_problems()), str(tmp_path / "train-00000-of-00001.parquet"))
    with open(tmp_path / "valid.jsonl", "w") as f:  # the other layout: a list of {language, solution}
        for p in cc_problems()[:1]:
            sols = lambda s: [{"language": l, "solution": c} for l, c in zip(s["language"], s["solution"])]  # noqa
            f.write(json.dumps({**p, "solutions": sols(p["solutions"]),
                                "incorrect_solutions": sols(p["incorrect_solutions"])}) + "\n")
    out = tmp_path / "cc"
    result = run("data/codecontests/prepare.py", f"--input={tmp_path / 'train-*.parquet'}",
                 f"--tokenizer={sp_model}", f"--out_dir={out}", "--max_solutions_per_problem=3")
    assert result.returncode == 0, result.stderr
    assert "skipped 1 problems" in result.stdout
    rows = read_jsonl(out / "train.jsonl")
    by_problem = {}
    for row in rows:
        by_problem.setdefault(row["problem_id"], []).append(row)
    assert list(by_problem) == ["1000_A. Double", "1000_C. Reverse"]  # ids from `name`; no Python 3 -> skipped
    double = by_problem["1000_A. Double"]
    assert [r["is_correct"] for r in double] == [True, False, True]  # alternating, duplicates removed, py2 dropped
    assert {r["completion"] for r in double if r["is_correct"]} == {"print(2*int(input()))\n",
                                                                    "n = int(input())\nprint(n * 2)\n"}
    assert double[1]["completion"] == "print(int(input()))\n"
    assert double[0]["prompt"].startswith("Print 2n.\n\n") and "Python 3" in double[0]["prompt"]
    assert len(by_problem["1000_C. Reverse"]) == 3

    result = run("data/codecontests/prepare.py", f"--input={tmp_path / 'valid.jsonl'}", f"--tokenizer={sp_model}",
                 f"--out_dir={out}")
    assert result.returncode == 0, result.stderr
    meta = load_meta(str(out))
    assert meta["splits"] == {"train": len(rows), "val": 3}  # train kept, val added
    assert meta["verifier"] is None and meta["problems"]["val"] == ["1000_A. Double"]
    val = read_jsonl(out / "val.jsonl")
    assert [r["completion"] for r in val] == [r["completion"] for r in double]  # same seeded choice either layout
    ds = TokenDataset(str(out), "train")
    tok = Tokenizer(sp_model)
    assert tok.decode(ds[0]["tokens"][ds[0]["prompt_len"]:]) == rows[0]["completion"]


def test_codecontests_bad_inputs(tmp_path, sp_model):
    good = json.dumps(cc_problems()[0])
    missing = json.dumps({k: v for k, v in cc_problems()[0].items() if k != "description"})
    bad_layout = json.dumps({**cc_problems()[0], "solutions": {"language": [3], "solution": []}})
    cases = [
        ([good, "{not json"], "train.jsonl:2: malformed JSON"),
        ([good, missing], "train.jsonl:2: missing field 'description'"),
        ([good, bad_layout], "train.jsonl:2: field 'solutions' has 1 languages but 0 solutions"),
        ([json.dumps(cc_problems()[1])], "no Python 3 solutions for split 'train'"),
    ]
    out = tmp_path / "cc"
    for lines, message in cases:
        write_rows(tmp_path / "train.jsonl", lines)
        result = run("data/codecontests/prepare.py", f"--input={tmp_path / 'train.jsonl'}",
                     f"--tokenizer={sp_model}", f"--out_dir={out}")
        assert result.returncode == 1 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert files_in(out) == []
    write_rows(tmp_path / "problems.jsonl", [good])
    result = run("data/codecontests/prepare.py", f"--input={tmp_path / 'problems.jsonl'}", f"--tokenizer={sp_model}",
                 f"--out_dir={out}")
    assert result.returncode == 1 and "cannot tell the split" in result.stderr
    result = run("data/codecontests/prepare.py", f"--input={tmp_path / 'nothing*.parquet'}", f"--tokenizer={sp_model}")
    assert result.returncode == 1 and "no such file" in result.stderr
    result = run("data/codecontests/prepare.py", f"--tokenizer={sp_model}")
    assert result.returncode == 2 and "--input is required" in result.stderr
    result = run("data/codecontests/prepare.py", f"--input={tmp_path / 'problems.jsonl'}", "--relabel=True")
    assert result.returncode == 2 and "--relabel=True needs --verify_labels=True" in result.stderr
    assert files_in(out) == []


def test_step_labels_in_the_token_data(arith_dir):
    """prepare.py stores first_error per row, and {split}.first_error.npy the token where that line
    starts (the tokens before it decode to exactly the completion before it); the loader hands it
    out per row, -1 for none; data without the file has no step labels."""
    tok = Tokenizer(os.path.join(arith_dir, "tokenizer.model"))
    rows = read_jsonl(os.path.join(arith_dir, "val.jsonl"))
    ds = TokenDataset(arith_dir, "val")
    assert ds.has_step_labels and len(ds.first_error) == len(rows)
    n_errors = 0
    for i, row in enumerate(rows):
        assert row["first_error"] == first_error(row["prompt"], row["completion"])
        item = ds[i]
        if row["first_error"] is None:
            assert item["first_error"] == -1 and row["is_correct"]
            continue
        n_errors += 1
        completion = item["tokens"][item["prompt_len"]:].tolist()
        j = item["first_error"] - item["prompt_len"]
        if row["first_error"] == len(row["completion"]):
            assert j == len(completion) - 1  # the eos
        else:
            assert tok.decode(completion[:j]) == row["completion"][:row["first_error"]]
    assert n_errors >= sum(not r["is_correct"] for r in rows) > 0  # every incorrect row has a wrong step
    batch = collate([ds[i] for i in range(4)], 3)
    assert batch["first_error"].tolist() == [ds[i]["first_error"] for i in range(4)]


def test_first_error_field_is_checked(tmp_path, sp_model):
    rows = [{"problem_id": "p", "prompt": "a", "completion": "bc", "is_correct": False, "first_error": 5}]
    with pytest.raises(ValueError, match="first_error"):
        write_dataset(str(tmp_path / "d"), {"train": rows}, Tokenizer(sp_model), sp_model)
    rows[0]["first_error"] = 1
    write_dataset(str(tmp_path / "d"), {"train": rows}, Tokenizer(sp_model), sp_model)
    ds = TokenDataset(str(tmp_path / "d"), "train")
    assert ds.has_step_labels and ds[0]["first_error"] >= ds[0]["prompt_len"]

