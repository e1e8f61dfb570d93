"""
MBPP (Austin et al. 2021) from the file you downloaded, into the repo's format: the original
(mbpp.jsonl: text, code, task_id, test_setup_code, test_list) or the sanitized subset
(sanitized-mbpp.json: prompt, code, task_id, test_imports, test_list), as JSON (a list), JSONL
or parquet (Hugging Face's google-research-datasets/mbpp files).

    python data/mbpp/prepare.py --input=mbpp.jsonl                          # text-only: enough for eval.py
    python data/mbpp/prepare.py --input=sanitized-mbpp.json --out_dir=data/mbpp_sanitized
    python data/mbpp/prepare.py --input='mbpp/full/*.parquet' --tokenizer=/models/7B_1T_4/tokenizer.model

Splits (--split=auto) by task_id, as the paper defines them: 1-10 prompt (the few-shot examples),
11-510 test, 511-600 val, 601-974 train; --split=NAME puts every row into NAME. One row per
problem: problem_id = "Mbpp/<task_id>", prompt = the usual harness format (the task text, then
the test asserts as examples: "You are an expert Python programmer, and here is your task: ...
Your code should pass these tests:\\n\\n<asserts>\\n"), completion = the reference code,
is_correct = true, and for the code verifier (data/code/verify.py): kind "function", prefix =
the setup code or test imports, test = the asserts, stop = where a continuation after the
solution begins (the completion is a whole program, so a new `def` or `class` is not a stop).
"""

import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from data.format import fail, parse_options, print_summary, write_dataset  # noqa: E402

DEFAULTS = {
    "input": "",  # mbpp.jsonl, sanitized-mbpp.json or parquet file(s) (a glob: quote it)
    "tokenizer": "",  # "" = text-only (no token files); or the model's tokenizer.model
    "out_dir": os.path.dirname(os.path.abspath(__file__)),  # data/mbpp
    "split": "auto",  # auto: by task_id (1-10 prompt, 11-510 test, 511-600 val, 601-974 train); or one split
}
STOP = ["\nassert", '\n"""', "\nprint(", "\nif __name__", "\n```", "[DONE]"]
INSTRUCTION = "You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:"


def read_rows(path):
    """(where, row) for every problem of a .json (a list, or JSONL), .jsonl or .parquet file."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError("reading parquet needs pyarrow: pip install pyarrow (or convert to JSONL)") from None
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {i}", row
        return
    if not path.endswith((".json", ".jsonl")):
        raise ValueError(f"{path}: expected a .json, .jsonl or .parquet file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):  # sanitized-mbpp.json: one JSON list
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        for i, row in enumerate(rows):
            yield f"{path} item {i}", row
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            yield f"{path}:{lineno}", row


def split_of(task_id, split_option):
    if split_option != "auto":
        return split_option
    return "prompt" if task_id <= 10 else "test" if task_id <= 510 else "val" if task_id <= 600 else "train"


def mbpp_row(row, where):
    """The repo's row for one MBPP problem, original or sanitized; errors name where and the field."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object")
    text = row.get("text", row.get("prompt"))  # original: text; sanitized: prompt
    if not isinstance(text, str):
        raise ValueError(f"{where}: missing field 'text' (or 'prompt')")
    if not isinstance(row.get("task_id"), int) or isinstance(row["task_id"], bool):
        raise ValueError(f"{where}: missing field 'task_id'" if "task_id" not in row else
                         f"{where}: field 'task_id' must be an integer")
    if not isinstance(row.get("code"), str):
        raise ValueError(f"{where}: missing field 'code'")
    tests = row.get("test_list")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise ValueError(f"{where}: field 'test_list' must be a non-empty list of strings")
    setup = row.get("test_setup_code") or ""  # original
    imports = row.get("test_imports") or []  # sanitized
    if not isinstance(setup, str) or not isinstance(imports, list):
        raise ValueError(f"{where}: field 'test_setup_code' must be a string and 'test_imports' a list")
    setup = "\n".join([*imports, setup]).strip()
    code = row["code"].replace("\r\n", "\n").strip("\n") + "\n"
    asserts = "\n".join(t.strip() for t in tests)
    prompt = INSTRUCTION.format(text=text.strip()) + f"\n\n{asserts}\n"
    return {"problem_id": f"Mbpp/{row['task_id']}", "prompt": prompt, "completion": code, "is_correct": True,
            "kind": "function", "prefix": setup + "\n" if setup else "", "test": asserts + "\n", "stop": STOP}


def main(opts):
    if not opts["input"]:
        fail("--input is required (mbpp.jsonl, sanitized-mbpp.json or parquet)")
    paths = sorted(glob.glob(opts["input"]))
    if not paths:
        raise FileNotFoundError(f"--input={opts['input']}: no such file")
    splits, seen = {}, {}
    for path in paths:
        for where, row in read_rows(path):
            r = mbpp_row(row, where)
            if r["problem_id"] in seen:
                raise ValueError(f"{where}: task_id {row['task_id']} already in {seen[r['problem_id']]}")
            seen[r["problem_id"]] = where
            splits.setdefault(split_of(row["task_id"], opts["split"]), []).append(r)
    if not splits:
        raise ValueError(f"--input={opts['input']}: no problems")
    tok = None
    if opts["tokenizer"]:
        from tokenizer import Tokenizer
        tok = Tokenizer(opts["tokenizer"])
    meta, stats = write_dataset(opts["out_dir"], splits, tok, opts["tokenizer"] or None, verifier="code")
    print_summary(opts["out_dir"], meta, stats)


if __name__ == "__main__":
    opts = parse_options(DEFAULTS)
    try:
        main(opts)
    except (ValueError, FileNotFoundError, ImportError) as e:
        fail(e, code=1)
