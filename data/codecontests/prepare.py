"""
Real data: deepmind/code_contests (problem descriptions with correct and incorrect solutions,
and stdin/stdout tests) into the repo's format, Python 3 solutions only. Download the parquet
files yourself, e.g. from https://huggingface.co/datasets/deepmind/code_contests
(data/train-*.parquet, valid-*, test-*).

    python data/codecontests/prepare.py --input='cc/train-*.parquet' --tokenizer=/models/7B_1T_4/tokenizer.model
    python data/codecontests/prepare.py --input='cc/valid-*.parquet' --tokenizer=/models/7B_1T_4/tokenizer.model
    python data/codecontests/prepare.py --input='cc/test-*.parquet'              # text-only: evaluation only
    python data/codecontests/prepare.py --input=rows.jsonl --split=train --tokenizer=... --out_dir=data/cc_small
    python data/codecontests/prepare.py --input='cc/valid-*.parquet' --verify_labels=True --relabel=True

Each run writes the splits of its input files (named from the file names: train, valid -> val,
test; or all into --split) and keeps the other splits already in --out_dir, so the splits can be
prepared one at a time (all with the same tokenizer). Input rows have `name`, `description`,
`solutions`, `incorrect_solutions`; the solutions are HF's columnar {"language": [...],
"solution": [...]} or a list of {"language", "solution"} (language 3 or "PYTHON3" is Python 3).
Row: prompt = description + a short instruction, completion = the code, is_correct = whether it
came from `solutions`; problem_id = `name`. At most --max_solutions_per_problem per problem,
alternating correct and incorrect ones (a seeded choice), exact duplicates removed. Without
--tokenizer the dataset is text-only (no token files; enough for eval.py).

Tests: {split}.problems.jsonl holds every problem of the input once, with or without a Python 3
solution (so every val/test problem is evaluable): prompt, kind "stdio", tests = public, then
private, then generated tests ({"input", "output"}; test_counts says how many of each),
time_limit (s) and memory_limit_mb; meta.json names the "code" verifier (data/code/verify.py).
The dataset's labels are noisy (an "incorrect" solution may pass every test, a "correct" one may
time out): --verify_labels=True runs every kept solution against its tests in the sandbox and
prints how the labels and the execution agree; --relabel=True then uses the execution's label
(rows keep "dataset_label" and the "execution" result).
"""

import glob
import json
import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from data.format import Progress, fail, iter_jsonl, parse_options, print_summary, write_dataset  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

DEFAULTS = {
    "input": "",  # parquet or JSONL file, or a glob of them (quote it)
    "tokenizer": "",  # tokenizer.model of the model you fine-tune (sentencepiece or tiktoken)
    "out_dir": os.path.dirname(os.path.abspath(__file__)),  # data/codecontests
    "split": "auto",  # auto: from each file's name (train-*, valid-*, test-*); or a split name for all rows
    "max_solutions_per_problem": 10,  # 0 = all
    "max_problems": 0,  # per split, 0 = all (for quick experiments)
    "seed": 0,
    "verify_labels": False,  # run every kept solution against its problem's tests and report agreement
    "relabel": False,  # with verify_labels: is_correct = passed every test (problems with tests only)
    "workers": 0,  # programs run in parallel by verify_labels (0 = the CPU count)
    "timeout": 3.0,  # seconds per test run when a problem has no time limit
}
TEST_FIELDS = ("public_tests", "private_tests", "generated_tests")
PYTHON3 = (3, "3", "PYTHON3", "python3")
INSTRUCTION = ("Write a Python 3 program that solves the problem above. It reads the input from standard input "
               "and writes the answer to standard output.\n")
SPLIT_NAMES = {"train": "train", "valid": "val", "validation": "val", "val": "val", "test": "test"}


def split_of(path, split_option):
    if split_option != "auto":
        return split_option
    m = re.match(r"(train|valid|validation|val|test)\b", os.path.basename(path))
    if m is None:
        raise ValueError(f"{path}: cannot tell the split from the file name; pass --split=train|val|test")
    return SPLIT_NAMES[m.group(1)]


def read_rows(path):
    """(where, row dict) for every row of a parquet or JSONL file."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError("reading parquet needs pyarrow: pip install pyarrow (or convert the rows to JSONL)") \
                from None
        columns = ["name", "description", "solutions", "incorrect_solutions"]
        file = pq.ParquetFile(path)
        missing = [c for c in columns if c not in file.schema_arrow.names]
        if missing:
            raise ValueError(f"{path}: missing column '{missing[0]}'")
        columns += [c for c in (*TEST_FIELDS, "time_limit", "memory_limit_bytes") if c in file.schema_arrow.names]
        i = 0
        for batch in file.iter_batches(batch_size=64, columns=columns):
            for row in batch.to_pylist():
                yield f"{path} row {i}", row
                i += 1
    elif path.endswith((".jsonl", ".json")):
        yield from iter_jsonl(path)
    else:
        raise ValueError(f"{path}: expected a .parquet or .jsonl file")


def python3_solutions(value, where, field):
    """Python 3 solution texts of a `solutions` value in either layout, in order."""
    if isinstance(value, dict) and isinstance(value.get("language"), list) and isinstance(value.get("solution"), list):
        if len(value["language"]) != len(value["solution"]):
            raise ValueError(f"{where}: field '{field}' has {len(value['language'])} languages but "
                             f"{len(value['solution'])} solutions")
        pairs = zip(value["language"], value["solution"])
    elif isinstance(value, list) and all(isinstance(s, dict) and "language" in s and "solution" in s for s in value):
        pairs = ((s["language"], s["solution"]) for s in value)
    else:
        raise ValueError(f"{where}: field '{field}' must be {{\"language\": [...], \"solution\": [...]}} or a list of "
                         f"{{\"language\", \"solution\"}}")
    out = []
    for language, solution in pairs:
        if language in PYTHON3:
            if not isinstance(solution, str):
                raise ValueError(f"{where}: field '{field}' holds a non-string solution")
            out.append(solution)
    return out


def clean_code(code):
    return "\n".join(line.rstrip() for line in code.replace("\r\n", "\n").strip("\n").split("\n")) + "\n"


def problem_tests(row, where):
    """The problem's tests, public then private then generated: ([{"input", "output"}], counts)."""
    tests, counts = [], {}
    for field in TEST_FIELDS:
        value = row.get(field)
        if value is None:
            counts[field.split("_")[0]] = 0
            continue
        if not (isinstance(value, dict) and isinstance(value.get("input"), list)
                and isinstance(value.get("output"), list) and len(value["input"]) == len(value["output"])
                and all(isinstance(x, str) for x in value["input"] + value["output"])):
            raise ValueError(f"{where}: field '{field}' must be {{\"input\": [str], \"output\": [str]}} "
                             f"of equal length")
        tests += [{"input": i, "output": o} for i, o in zip(value["input"], value["output"])]
        counts[field.split("_")[0]] = len(value["input"])
    return tests, counts


def problem_spec(row, where, prompt):
    """The problem as the code verifier reads it (one line of {split}.problems.jsonl)."""
    tests, counts = problem_tests(row, where)
    limit = row.get("time_limit")
    if isinstance(limit, dict):  # HF: {"seconds": int, "nanos": int}
        limit = (limit.get("seconds") or 0) + (limit.get("nanos") or 0) / 1e9
    memory = row.get("memory_limit_bytes")
    return {"problem_id": row["name"], "prompt": prompt, "kind": "stdio", "tests": tests, "test_counts": counts,
            "time_limit": float(limit) if limit else None,
            "memory_limit_mb": int(memory) // 2**20 if memory else None}


def problem_rows(row, where, max_solutions, seed):
    """The repo's rows for one code_contests problem (maybe none: no Python 3 solution), and the
    problem's verifier spec."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object")
    for field in ("name", "description", "solutions", "incorrect_solutions"):
        if field not in row or row[field] is None:
            raise ValueError(f"{where}: missing field '{field}'")
    for field in ("name", "description"):
        if not isinstance(row[field], str):
            raise ValueError(f"{where}: field '{field}' must be a string")
    rng = random.Random(f"{seed}-{row['name']}")
    labelled = []
    for field, label in (("solutions", True), ("incorrect_solutions", False)):
        codes = list(dict.fromkeys(clean_code(c) for c in python3_solutions(row[field], where, field)))
        rng.shuffle(codes)
        labelled.append([(code, label) for code in codes])
    correct, incorrect = labelled
    chosen = [pair for two in zip(correct, incorrect) for pair in two]  # alternate while both last
    n = min(len(correct), len(incorrect))
    chosen += correct[n:] + incorrect[n:]
    if max_solutions > 0:
        chosen = chosen[:max_solutions]
    prompt = f"{row['description'].strip()}\n\n{INSTRUCTION}"
    rows = [{"problem_id": row["name"], "prompt": prompt, "completion": code, "is_correct": label}
            for code, label in chosen]
    return rows, problem_spec(row, where, prompt)


def verify_labels(splits, problems, relabel, workers, timeout):
    """Run every row's solution against its problem's tests; print label vs execution per split;
    with relabel, is_correct = passed (rows of problems without tests keep their label)."""
    from data.code.verify import verify_all
    for split, rows in splits.items():
        todo = [r for r in rows if problems[split][r["problem_id"]]["tests"]]
        results = verify_all([problems[split][r["problem_id"]] for r in todo], [r["completion"] for r in todo],
                             workers=workers, timeout=timeout, label=f"verifying {split}")
        table = {(label, ok): 0 for label in (True, False) for ok in (True, False)}
        for row, result in zip(todo, results):
            table[(row["is_correct"], result["passed"])] += 1
            row["dataset_label"], row["execution"] = row["is_correct"], result["result"]
            if relabel:
                row["is_correct"] = result["passed"]
        agree = table[(True, True)] + table[(False, False)]
        print(f"  {split:>5}: labels vs execution on {len(todo)} solutions ({len(rows) - len(todo)} without tests): "
              f"correct+passed {table[(True, True)]}, correct+failed {table[(True, False)]}, "
              f"incorrect+passed {table[(False, True)]}, incorrect+failed {table[(False, False)]} "
              f"(agree {100 * agree / max(len(todo), 1):.1f}%){'; relabelled' if relabel else ''}")


def main(opts):
    if not opts["input"]:
        fail("--input is required")
    if opts["relabel"] and not opts["verify_labels"]:
        fail("--relabel=True needs --verify_labels=True")
    paths = sorted(glob.glob(opts["input"]))
    if not paths:
        raise FileNotFoundError(f"--input={opts['input']}: no such file")
    tok = Tokenizer(opts["tokenizer"]) if opts["tokenizer"] else None
    splits, problems, n_problems, n_skipped = {}, {}, {}, 0
    for path in paths:
        split = split_of(path, opts["split"])
        rows = splits.setdefault(split, [])
        specs = problems.setdefault(split, {})
        progress = Progress(f"reading {path}", "?")
        for i, (where, row) in enumerate(read_rows(path)):
            if opts["max_problems"] and n_problems.get(split, 0) >= opts["max_problems"]:
                break
            new, spec = problem_rows(row, where, opts["max_solutions_per_problem"], opts["seed"])
            rows.extend(new)
            specs.setdefault(spec["problem_id"], spec)
            n_problems[split] = n_problems.get(split, 0) + (1 if new else 0)
            n_skipped += 0 if new else 1
            progress.update(i + 1)
    for split, rows in splits.items():
        if not rows:
            raise ValueError(f"no Python 3 solutions for split '{split}' in {opts['input']}")
    with_tests = any(spec["tests"] for specs in problems.values() for spec in specs.values())
    if opts["verify_labels"]:
        if not with_tests:
            raise ValueError(f"--verify_labels: the problems of {opts['input']} have no tests")
        verify_labels(splits, problems, opts["relabel"], opts["workers"], opts["timeout"])
    os.makedirs(opts["out_dir"], exist_ok=True)
    extra = {}  # {split}.problems.jsonl, moved into out_dir with the rest of the dataset
    try:
        for split, specs in problems.items():
            name = f"{split}.problems.jsonl"
            extra[name] = os.path.join(opts["out_dir"], f".{name}.tmp{os.getpid()}")
            with open(extra[name], "w", encoding="utf-8") as f:
                for spec in specs.values():
                    f.write(json.dumps(spec, ensure_ascii=False) + "\n")
    except BaseException:
        for path in extra.values():
            if os.path.exists(path):
                os.remove(path)
        raise
    meta, stats = write_dataset(opts["out_dir"], splits, tok, opts["tokenizer"] or None,
                                verifier="code" if with_tests else None, extra_files=extra, merge=True)
    print_summary(opts["out_dir"], meta, stats)
    print(f"  skipped {n_skipped} problems without a Python 3 solution (their tests are in "
          f"{{split}}.problems.jsonl, for evaluation)")


if __name__ == "__main__":
    opts = parse_options(DEFAULTS)
    try:
        main(opts)
    except (ValueError, FileNotFoundError, ImportError) as e:
        fail(e, code=1)
