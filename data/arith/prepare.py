"""
The embedded default dataset: multi-step arithmetic with step-by-step solutions, generated here
in seconds with no download, plus its own small sentencepiece tokenizer.

    python data/arith/prepare.py                          # -> data/arith/{train,val,test}.*, meta.json, tokenizer.model
    python data/arith/prepare.py --n_train_problems=20000 --max_ops=5 --max_operand=50 --out_dir=data/arith_big
    python data/arith/prepare.py --tokenizer=/models/7B_1T_4/tokenizer.model --out_dir=data/arith_llama

One problem and one candidate (prompt | completion):

    Compute: 3 + 4 * (12 - 5)
    = 3 + 4 * 7
    = 3 + 28
    = 31
    Answer: 31

Each step evaluates one operation (the leftmost whose operands are both numbers) and rewrites
the rest. An incorrect candidate holds one kind of mistake, made at a specific step; the later
steps carry the wrong value forward correctly.
  random slips (one step):  value      the step's result is off (+-1, +-2, +-10, or a digit changed)
                            operator   the step applies another operator
                            drop_term  a term (e.g. "- 5") is lost while rewriting
  systematic (every step):  precedence left to right, ignoring * before + and -
                            carry      additions forget their carries (28 + 15 = 33)
                            sign       negative results lose their sign
Systematic mistakes are what uniform training learns to imitate. Every is_correct label comes
from verify.py on the final text (a slip that still reaches the right answer is correct); the
intended mistake is kept in the row's extra "slip" field (null when none), for analysis only.
Step labels: each row's "first_error" is verify.first_error's character offset of the first
wrong line (null when every line is right), and {split}.first_error.npy holds its token position
(see data/format.py), for the positive controls and the prefix critic.
Problems are distinct across train/val/test; test is drawn first, so changing the train size
keeps val and test. Same options, same seed: byte-identical files.
"""

import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from data.arith.verify import FLAT_PRECEDENCE, OPS, PRECEDENCE, first_error, parse_expression, verify  # noqa: E402
from data.format import fail, parse_options, print_summary, write_dataset  # noqa: E402
from tokenizer import Tokenizer, train_sentencepiece  # noqa: E402

DEFAULTS = {
    "seed": 1337,
    "out_dir": os.path.dirname(os.path.abspath(__file__)),  # data/arith
    "n_train_problems": 5000,
    "n_val_problems": 200,
    "n_test_problems": 200,
    "candidates_per_problem": 4,
    "min_ops": 2,  # operators per problem
    "max_ops": 3,
    "max_operand": 9,  # operands are 1..max_operand (single digits: a tiny model on a CPU learns them)
    "max_value": 100,  # every intermediate value of the true solution stays within +-max_value
    "slip_ratio": 0.5,  # share of candidates generated with a mistake
    "systematic_ratio": 0.7,  # share of those mistakes meant to be systematic (random when none applies)
    "vocab_size": 128,  # upper bound: sentencepiece stops earlier on this small alphabet
    "tokenizer": None,  # None: train our own; or an existing tokenizer.model (e.g. Meta's) to use
}
RANDOM_SLIPS = ["value", "operator", "drop_term"]
SYSTEMATIC_SLIPS = ["precedence", "carry", "sign"]

# -----------------------------------------------------------------------------
# expression trees: an int leaf, (op, left, right), or ("()", inner) for a group written in
# parentheses (only in the precedence mistake, which must keep the problem's parentheses)


def random_tree(n_ops, rng, max_operand):
    if n_ops == 0:
        return rng.randint(1, max_operand)
    n_left = rng.randint(0, n_ops - 1)
    return (rng.choice("+-*"), random_tree(n_left, rng, max_operand),
            random_tree(n_ops - 1 - n_left, rng, max_operand))


def render(tree, prec=PRECEDENCE, top=True):
    """Tree -> text with the fewest parentheses that parse back to the same tree under prec."""
    if isinstance(tree, int):
        return str(tree) if tree >= 0 or top else f"({tree})"
    if tree[0] == "()":
        return f"({render(tree[1], prec)})"
    op, left, right = tree
    left_text, right_text = render(left, prec, False), render(right, prec, False)
    if isinstance(left, tuple) and left[0] in prec and prec[left[0]] < prec[op]:
        left_text = f"({left_text})"
    if isinstance(right, tuple) and right[0] in prec and prec[right[0]] <= prec[op]:
        right_text = f"({right_text})"
    return f"{left_text} {op} {right_text}"


def ready_path(tree):
    """Child indices down to the leftmost operation whose operands are both numbers."""
    path = ()
    while True:
        if tree[0] == "()":
            path, tree = path + (1,), tree[1]
            continue
        _, left, right = tree
        if isinstance(left, tuple):
            path, tree = path + (1,), left
        elif isinstance(right, tuple):
            path, tree = path + (2,), right
        else:
            return path


def get(tree, path):
    for i in path:
        tree = tree[i]
    return tree


def replace(tree, path, value):
    if not path:
        return value
    parts = list(tree)
    parts[path[0]] = replace(tree[path[0]], path[1:], value)
    return tuple(parts)


def n_ops(tree):
    if isinstance(tree, int):
        return 0
    return n_ops(tree[1]) if tree[0] == "()" else 1 + n_ops(tree[1]) + n_ops(tree[2])


def solve(tree, result=None, rewrite=None):
    """
    The expression after each step (the last is the answer, an int). Slips hook in here:
    result(step, op, a, b, value) -> the value written for that step's operation;
    rewrite(step, tree) -> the expression as rewritten after that step.
    """
    states = []
    while isinstance(tree, tuple):
        path = ready_path(tree)
        op, a, b = get(tree, path)
        value = OPS[op](a, b)
        if result is not None:
            value = result(len(states), op, a, b, value)
        tree = replace(tree, path, value)
        if path and get(tree, path[:-1])[0] == "()":  # "(7)" -> "7"
            tree = replace(tree, path[:-1], value)
        if rewrite is not None:
            tree = rewrite(len(states), tree)
        states.append(tree)
    return states


def solution_text(states, prec=PRECEDENCE):
    return "\n".join([f"= {render(s, prec)}" for s in states] + [f"Answer: {states[-1]}"])


# -----------------------------------------------------------------------------
# mistakes: each returns (states, precedence used to write them)


def perturb(value, rng):
    """A plausible wrong result: off by 1, 2 or 10, or one digit changed."""
    while True:
        kind = rng.randrange(3)
        if kind == 0:
            wrong = value + rng.choice([-2, -1, 1, 2])
        elif kind == 1:
            wrong = value + rng.choice([-10, 10])
        else:
            digits = str(abs(value))
            i = rng.randrange(len(digits))
            digit = rng.choice([d for d in "0123456789" if d != digits[i]])
            wrong = int(digits[:i] + digit + digits[i + 1:]) * (-1 if value < 0 else 1)
        if wrong != value:
            return wrong


def slip_value(tree, rng, step):
    return solve(tree, result=lambda s, op, a, b, v: perturb(v, rng) if s == step else v), PRECEDENCE


def slip_operator(tree, rng, step):
    def result(s, op, a, b, v):
        if s != step:
            return v
        wrong = [OPS[o](a, b) for o in "+-*" if o != op and OPS[o](a, b) != v]
        return rng.choice(wrong) if wrong else v
    return solve(tree, result=result), PRECEDENCE


def slip_drop_term(tree, rng, step):
    def rewrite(s, t):
        if s != step or isinstance(t, int):
            return t
        # (path, kept child) for every operation with a number operand that can be dropped
        options = []
        stack = [()]
        while stack:
            path = stack.pop()
            _, left, right = get(t, path)
            for i, child in ((1, left), (2, right)):
                if isinstance(child, int):
                    options.append((path, 3 - i))  # drop child i, keep the other
                else:
                    stack.append(path + (i,))
        options.sort()
        path, keep = rng.choice(options)
        return replace(t, path, get(t, path)[keep])
    return solve(tree, rewrite=rewrite), PRECEDENCE


def slip_precedence(tree, rng, step):
    # the problem as read left to right, its parentheses kept as written
    return solve(parse_expression(render(tree), flat=True, keep_parens=True)), FLAT_PRECEDENCE


def add_without_carry(a, b):
    """Column-wise addition that forgets carries: 28 + 15 -> 33."""
    total, place = 0, 1
    while a or b:
        total += (a % 10 + b % 10) % 10 * place
        a, b, place = a // 10, b // 10, place * 10
    return total


def slip_carry(tree, rng, step):
    return solve(tree, result=lambda s, op, a, b, v: add_without_carry(a, b) if op == "+" and a >= 0 and b >= 0
                 else v), PRECEDENCE


def slip_sign(tree, rng, step):
    return solve(tree, result=lambda s, op, a, b, v: -v if v < 0 else v), PRECEDENCE


SLIPS = {"value": slip_value, "operator": slip_operator, "drop_term": slip_drop_term,
         "precedence": slip_precedence, "carry": slip_carry, "sign": slip_sign}


def try_slip(kind, tree, rng, correct_text):
    """The text of a solution with this mistake, or None when it changes nothing here."""
    steps = list(range(n_ops(tree))) if kind in RANDOM_SLIPS else [0]
    rng.shuffle(steps)
    for step in steps:
        text = solution_text(*SLIPS[kind](tree, rng, step))
        if text != correct_text:
            return text
    return None


def make_candidates(tree, n, rng, slip_ratio, systematic_ratio):
    """[(completion, intended slip or None)] * n for one problem."""
    correct_text = solution_text(solve(tree))
    candidates = []
    for _ in range(n):
        if rng.random() >= slip_ratio:
            candidates.append((correct_text, None))
            continue
        first, second = ((SYSTEMATIC_SLIPS, RANDOM_SLIPS) if rng.random() < systematic_ratio
                         else (RANDOM_SLIPS, SYSTEMATIC_SLIPS))
        for kind in rng.sample(first, len(first)) + rng.sample(second, len(second)):
            text = try_slip(kind, tree, rng, correct_text)
            if text is not None:
                candidates.append((text, kind))
                break
        else:
            candidates.append((correct_text, None))
    return candidates


# -----------------------------------------------------------------------------
# the dataset


def make_problems(opts):
    """{split: [tree]}, distinct by expression text across splits; test first, then val, train."""
    rng = random.Random(opts["seed"])
    seen, problems = set(), {}
    for split in ("test", "val", "train"):
        n, trees, attempts = opts[f"n_{split}_problems"], [], 0
        while len(trees) < n:
            attempts += 1
            if attempts > 100 * n + 10000:
                raise ValueError(f"found only {len(trees)} new {split} problems of {n} after {attempts} tries: "
                                 f"raise --max_operand, --max_ops or --max_value")
            tree = random_tree(rng.randint(opts["min_ops"], opts["max_ops"]), rng, opts["max_operand"])
            text = render(tree)
            values = []
            solve(tree, result=lambda s, op, a, b, v: values.append(v) or v)
            if text in seen or max(abs(v) for v in values) > opts["max_value"]:
                continue
            seen.add(text)
            trees.append(tree)
        problems[split] = trees
    return problems


def make_rows(split, trees, opts):
    rows = []
    for i, tree in enumerate(trees):
        problem_id = f"{split}-{i:05d}"
        rng = random.Random(f"{opts['seed']}-{problem_id}")  # a problem's candidates depend on nothing else
        prompt = f"Compute: {render(tree)}\n"
        for completion, slip in make_candidates(tree, opts["candidates_per_problem"], rng, opts["slip_ratio"],
                                                opts["systematic_ratio"]):
            rows.append({"problem_id": problem_id, "prompt": prompt, "completion": completion,
                         "is_correct": verify(prompt, completion), "slip": slip,
                         "first_error": first_error(prompt, completion)})
    return rows


def check_options(opts):
    for key in ("n_train_problems", "n_val_problems", "n_test_problems", "candidates_per_problem", "min_ops",
                "max_operand", "max_value", "vocab_size"):
        if opts[key] < 1:
            fail(f"--{key} must be >= 1, got {opts[key]}")
    if opts["max_ops"] < opts["min_ops"]:
        fail(f"--max_ops ({opts['max_ops']}) must be >= --min_ops ({opts['min_ops']})")
    for key in ("slip_ratio", "systematic_ratio"):
        if not 0.0 <= opts[key] <= 1.0:
            fail(f"--{key} must be in [0, 1], got {opts[key]}")


def print_slips(splits):
    rows = [row for split_rows in splits.values() for row in split_rows]
    parts = []
    for kind in [None] + RANDOM_SLIPS + SYSTEMATIC_SLIPS:
        labels = [row["is_correct"] for row in rows if row["slip"] == kind]
        if labels:
            parts.append(f"{kind or 'none'} {len(labels)} ({100 * sum(labels) / len(labels):.1f}% correct)")
    print("  intended slips (all splits): " + ", ".join(parts))


def main(opts):
    t0 = time.time()
    out_dir = opts["out_dir"]
    problems = make_problems(opts)
    splits = {split: make_rows(split, problems[split], opts) for split in ("train", "val", "test")}
    extra_files = {}
    try:
        if opts["tokenizer"] is None:  # a tokenizer of our own, trained on the train split
            os.makedirs(out_dir, exist_ok=True)
            prefix = os.path.join(out_dir, f".tokenizer.tmp{os.getpid()}")
            extra_files = {"tokenizer.model": prefix + ".model"}
            texts = [text for row in splits["train"] for text in (row["prompt"], row["completion"])]
            train_sentencepiece(texts, prefix, opts["vocab_size"], byte_fallback=False)
            tok, tokenizer_path = Tokenizer(prefix + ".model"), os.path.join(out_dir, "tokenizer.model")
            for row in splits["val"] + splits["test"]:  # no byte fallback: every char must be a piece
                for text in (row["prompt"], row["completion"]):
                    if tok.decode(tok.encode(text)) != text:
                        raise ValueError(f"tokenizer trained on train does not round-trip a {row['problem_id']} "
                                         f"text: {text!r}")
        else:
            tok, tokenizer_path = Tokenizer(opts["tokenizer"]), opts["tokenizer"]
        meta, stats = write_dataset(out_dir, splits, tok, tokenizer_path, verifier="arith", extra_files=extra_files)
    except BaseException:
        for path in extra_files.values():
            if os.path.exists(path):
                os.remove(path)
        raise
    print_summary(out_dir, meta, stats)
    print_slips(splits)
    print(f"  took {time.time() - t0:.1f}s")


if __name__ == "__main__":
    opts = parse_options(DEFAULTS)
    check_options(opts)
    try:
        main(opts)
    except (ValueError, FileNotFoundError) as e:
        fail(e, code=1)
