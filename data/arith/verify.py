"""
The arithmetic verifier: it labels data/arith's candidates and scores eval.py's generations.
Only the final answer counts: it is recomputed exactly (Python ints) from the problem in the
prompt, so a slip that happens to reach the right answer is correct, and any completion whose
last non-empty line is not `Answer: <integer>` is wrong.

    prompt:      "Compute: 3 + 4 * (12 - 5)\n"
    completion:  "= 3 + 4 * 7\n= 3 + 28\n= 31\nAnswer: 31"
    verify(prompt, completion) -> True

It also gives step labels: first_error(prompt, completion) is the character offset in the
completion where the first wrong line starts (None when every line is right), so a training run
or an evaluation can tell the tokens before the first mistake from those after it.
"""

import re

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
PRECEDENCE = {"+": 1, "-": 1, "*": 2}  # school rules
FLAT_PRECEDENCE = {"+": 1, "-": 1, "*": 1}  # "left to right, ignoring precedence" (a systematic mistake)
TOKEN_RE = re.compile(r"\s*(\d+|[-+*()])")
PROMPT_RE = re.compile(r"Compute:(.+)")
ANSWER_RE = re.compile(r"Answer:\s*(-?\d+)")


def tokenize(text):
    """'3 + (4*5)' -> ['3', '+', '(', '4', '*', '5', ')']; ValueError on anything else."""
    tokens, pos, text = [], 0, text.rstrip()
    while pos < len(text):
        m = TOKEN_RE.match(text, pos)
        if m is None:
            raise ValueError(f"bad character at {pos} in expression {text!r}")
        tokens.append(m.group(1))
        pos = m.end()
    return tokens


def parse_expression(text, flat=False, keep_parens=False):
    """
    Expression text -> tree: an int leaf, or a tuple (op, left, right). Operators are left
    associative; flat=True gives * the precedence of + and - (how the precedence mistake reads
    it); keep_parens=True keeps each parenthesized group as a node ("()", inner) so that it can
    be written back as it was. A number may carry a unary minus ("-7", "(-7)"), nothing else may.
    """
    prec = FLAT_PRECEDENCE if flat else PRECEDENCE
    tokens = tokenize(text)
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take(expected=None):
        nonlocal pos
        tok = peek()
        if tok is None or (expected is not None and tok != expected):
            raise ValueError(f"expected {expected or 'more'} at token {pos} in {text!r}")
        pos += 1
        return tok

    def primary():
        tok = take()
        if tok == "(":
            tree = expression(0)
            take(")")
            return ("()", tree) if keep_parens and isinstance(tree, tuple) else tree
        if tok == "-" and peek() is not None and peek().isdigit():
            return -int(take())
        if tok.isdigit():
            return int(tok)
        raise ValueError(f"unexpected {tok!r} at token {pos - 1} in {text!r}")

    def expression(min_prec):
        left = primary()
        while peek() in prec and prec[peek()] >= min_prec:
            op = take()
            right = expression(prec[op] + 1)
            left = (op, left, right)
        return left

    tree = expression(0)
    if pos != len(tokens):
        raise ValueError(f"unexpected {tokens[pos]!r} at token {pos} in {text!r}")
    return tree


def evaluate(tree):
    if isinstance(tree, int):
        return tree
    if tree[0] == "()":
        return evaluate(tree[1])
    op, left, right = tree
    return OPS[op](evaluate(left), evaluate(right))


def problem_expression(prompt):
    """'Compute: 3 + 4\\n' -> '3 + 4' (ValueError when the prompt is not an arith prompt)."""
    m = PROMPT_RE.fullmatch(prompt.strip())
    if m is None:
        raise ValueError(f"not an arith prompt (expected 'Compute: <expression>'): {prompt[:60]!r}")
    return m.group(1).strip()


def extract_answer(completion):
    """The integer string on the completion's last non-empty line `Answer: <int>`, else None."""
    lines = completion.strip().splitlines()
    if not lines:
        return None
    m = ANSWER_RE.fullmatch(lines[-1].strip())
    return m.group(1) if m else None


def verify(prompt, completion):
    """True iff the completion's final answer equals the exact value of the prompt's problem."""
    answer = extract_answer(completion)
    if answer is None:
        return False
    try:
        value = int(answer)
    except ValueError:  # e.g. more digits than int() accepts
        return False
    return value == evaluate(parse_expression(problem_expression(prompt)))


def first_error(prompt, completion):
    """
    Character offset in `completion` of the first wrong line, None when every line is right.

    Every `= <expression>` line must keep the problem's value (its expression, read with school
    precedence, evaluates to the problem's exact value); the `Answer: <int>` line must give that
    value and be the last line. A line that does not parse (or any line after the answer) is
    wrong. A completion that never reaches an answer is wrong where it ends (offset =
    len(completion), the end-of-sequence token). Independent of verify(): a slip whose
    later lines land on the right answer is still found here.
    """
    value = evaluate(parse_expression(problem_expression(prompt)))
    offset, answered = 0, False
    for line in completion.splitlines(keepends=True):
        text = line.strip()
        if text:
            if answered:
                return offset
            m = ANSWER_RE.fullmatch(text)
            if m is not None:
                if int(m.group(1)) != value:
                    return offset
                answered = True
            elif not text.startswith("="):
                return offset
            else:
                try:
                    if evaluate(parse_expression(text[1:])) != value:
                        return offset
                except ValueError:
                    return offset
        offset += len(line)
    return None if answered else len(completion)

