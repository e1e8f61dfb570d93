"""
Real data: deepmind/code_contests (problem descriptions with correct and incorrect solutions)
into the repo's format, Python 3 solutions only. Download the parquet files yourself, e.g. from
https://huggingface.co/datasets/deepmind/code_contests (data/train-*.parquet, valid-*, test-*).

    python data/codecontests/prepare.py --input='cc/train-*.parquet' --tokenizer=/models/7B_1T_4/tokenizer.model
    python data/codecontests/prepare.py --input='cc/valid-*.parquet' --tokenizer=/models/7B_1T_4/tokenizer.model
    python data/codecontests/prepare.py --input=rows.jsonl --split=train --tokenizer=... --out_dir=data/cc_small

Each run writes the splits of its input files (named from the file names: train, valid -> val,
test; or all into --split) and keeps the other splits already in --out_dir, so the splits can be
prepared one at a time (all with the same tokenizer). Input rows have `name`, `description`,
`solutions`, `incorrect_solutions`; the solutions are HF's columnar {"language": [...],
"solution": [...]} or a list of {"language", "solution"} (language 3 or "PYTHON3" is Python 3).
Row: prompt = description + a short instruction, completion = the code, is_correct = whether it
came from `solutions`; problem_id = `name`. At most --max_solutions_per_problem per problem,
alternating correct and incorrect ones (a seeded choice), exact duplicates removed.
"""

import glob
import json
import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from data.format import Progress, fail, parse_options, print_summary, write_dataset  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

DEFAULTS = {
    "input": "",  # parquet or JSONL file, or a glob of them (quote it)
    "tokenizer": "",  # tokenizer.model of the model you fine-tune (sentencepiece or tiktoken)
    "out_dir": os.path.dirname(os.path.abspath(__file__)),  # data/codecontests
    "split": "auto",  # auto: from each file's name (train-*, valid-*, test-*); or a split name for all rows
    "max_solutions_per_problem": 10,  # 0 = all
    "max_problems": 0,  # per split, 0 = all (for quick experiments)
    "seed": 0,
}
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
        i = 0
        for batch in file.iter_batches(batch_size=64, columns=columns):
            for row in batch.to_pylist():
                yield f"{path} row {i}", row
                i += 1
    elif path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
                yield f"{path}:{lineno}", row
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


def problem_rows(row, where, max_solutions, seed):
    """The repo's rows for one code_contests problem (maybe none: no Python 3 solution)."""
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
    return [{"problem_id": row["name"], "prompt": prompt, "completion": code, "is_correct": label}
            for code, label in chosen]


def main(opts):
    if not opts["input"] or not opts["tokenizer"]:
        fail("--input and --tokenizer are required")
    paths = sorted(glob.glob(opts["input"]))
    if not paths:
        raise FileNotFoundError(f"--input={opts['input']}: no such file")
    tok = Tokenizer(opts["tokenizer"])
    splits, n_problems, n_skipped = {}, {}, 0
    for path in paths:
        split = split_of(path, opts["split"])
        rows = splits.setdefault(split, [])
        progress = Progress(f"reading {path}", "?")
        for i, (where, row) in enumerate(read_rows(path)):
            if opts["max_problems"] and n_problems.get(split, 0) >= opts["max_problems"]:
                break
            new = problem_rows(row, where, opts["max_solutions_per_problem"], opts["seed"])
            rows.extend(new)
            n_problems[split] = n_problems.get(split, 0) + (1 if new else 0)
            n_skipped += 0 if new else 1
            progress.update(i + 1)
    for split, rows in splits.items():
        if not rows:
            raise ValueError(f"no Python 3 solutions for split '{split}' in {opts['input']}")
    meta, stats = write_dataset(opts["out_dir"], splits, tok, opts["tokenizer"], verifier=None, merge=True)
    print_summary(opts["out_dir"], meta, stats)
    print(f"  skipped {n_skipped} problems without a Python 3 solution")


if __name__ == "__main__":
    opts = parse_options(DEFAULTS)
    try:
        main(opts)
    except (ValueError, FileNotFoundError, ImportError) as e:
        fail(e, code=1)
