"""
The one data format every stage reads, written once for all prepare scripts.

Raw rows (JSONL): {"problem_id": str, "prompt": str, "completion": str, "is_correct": bool}
(extra keys are kept in {split}.jsonl and ignored). A prepared dataset dir holds, per split,
{split}.jsonl, {split}.bin (tokens `[bos] prompt completion [eos]` of every row, concatenated)
and {split}.idx.npy (int64 (N, 5): offset, prompt_len, length, label, problem), plus meta.json.
A text-only dataset (prepared without a tokenizer: meta.json's tokenizer fields are null) has no
token files: enough for evaluation, where eval.py encodes the prompts with the model's tokenizer.
Code datasets may add {split}.problems.jsonl: one row per problem with what the verifier needs.
Everything is written to temp names first and renamed at the end (meta.json last), so an error
leaves no partial dataset behind.

Step labels (optional): rows may carry "first_error", the character offset in the completion
where the first wrong step starts (null: every step right). A split with the field also gets
{split}.first_error.npy, int64 (N,): the position (in the row's tokens) of the token where that
step starts, -1 for none; meta.json then says "step_labels": true.

Also a script for your own rows: tokenize the {split}.jsonl files of a folder,
    python data/format.py --in_dir=my_rows/ --tokenizer=path/to/tokenizer.model --out_dir=data/mine
"""

import glob
import gzip
import json
import os
import sys
import time

import numpy as np

if __name__ == "__main__":  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FIELDS = {"problem_id": str, "prompt": str, "completion": str, "is_correct": bool}
JSON_TYPE = {str: "a string", bool: "true or false"}


# -----------------------------------------------------------------------------
# command line options of the prepare scripts


def parse_options(defaults, argv=None):
    """--key=value args -> dict, typed like `defaults`; a bad option is one line on stderr, exit 2."""
    argv = sys.argv[1:] if argv is None else argv
    options = dict(defaults)
    for arg in argv:
        if arg in ("-h", "--help"):
            print("options (--key=value): " + " ".join(f"--{k}={v}" for k, v in defaults.items()))
            sys.exit(0)
        if not arg.startswith("--") or "=" not in arg:
            fail(f"expected --key=value, got {arg!r}")
        key, value = arg[2:].split("=", 1)
        if key not in defaults:
            fail(f"unknown option --{key} (known: {', '.join(defaults)})")
        default = defaults[key]
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                options[key] = value.lower() in ("true", "1")
            elif isinstance(default, int):
                options[key] = int(value)
            elif isinstance(default, float):
                options[key] = float(value)
            else:  # str or None
                options[key] = None if value == "None" else value
        except ValueError:
            fail(f"--{key}={value}: expected {type(default).__name__}")
    return options


def error_line(message) -> str:
    """'script.py: error: message' on one line: the one format of every entry point's errors."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "wmtp"
    return f"{prog}: error: {' '.join(str(message).splitlines())}"


def fail(message, code=2):
    """Print error_line(message) on stderr and exit with `code` (2: bad input or settings, before any
    work; 1: the work itself failed)."""
    print(error_line(message), file=sys.stderr, flush=True)
    sys.exit(code)


# -----------------------------------------------------------------------------
# reading and checking raw rows


def check_row(row, where):
    """Raise a one-line ValueError naming `where` (file:line) and the field when row is malformed."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key, typ in FIELDS.items():
        if key not in row:
            raise ValueError(f"{where}: missing field '{key}'")
        if type(row[key]) is not typ:  # bool is not int, 1 is not true
            raise ValueError(f"{where}: field '{key}' must be {JSON_TYPE[typ]}, got {json.dumps(row[key])[:40]}")
    fe = row.get("first_error")
    if fe is not None and (type(fe) is not int or not 0 <= fe <= len(row["completion"])):
        raise ValueError(f"{where}: field 'first_error' must be null or a character offset in the completion "
                         f"(0..{len(row['completion'])}), got {json.dumps(fe)[:40]}")
    return row


def iter_jsonl(path, fields=()):
    """(where, row) for each non-empty line of a JSONL file (.jsonl.gz too), where = 'path:line'.
    Every row is a JSON object with the string `fields`; anything else (a malformed or truncated
    line, a missing field, a damaged .gz) is a one-line ValueError naming the file and the line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{where}: expected a JSON object")
                for key in fields:
                    if not isinstance(row.get(key), str):
                        raise ValueError(f"{where}: missing field '{key}'" if key not in row else
                                         f"{where}: field '{key}' must be a string")
                yield where, row
    except (OSError, EOFError, UnicodeDecodeError) as e:  # e.g. a truncated .gz
        raise ValueError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def read_jsonl(path):
    """Rows of one raw split file, every row checked; errors name the file and line."""
    rows = [check_row(row, where) for where, row in iter_jsonl(path)]
    if not rows:
        raise ValueError(f"{path}: no rows (empty split)")
    return rows


# -----------------------------------------------------------------------------
# writing a prepared dataset


def token_dtype(vocab_size):
    return "uint16" if vocab_size <= 2**16 else "uint32"


def tokenizer_meta(tokenizer, tokenizer_path, out_dir):
    """meta.json's tokenizer fields; a tokenizer inside out_dir is stored relative to it (portable)."""
    path = str(tokenizer_path)
    if os.path.dirname(os.path.abspath(path)) == os.path.abspath(out_dir):
        path = os.path.basename(path)
    elif os.path.exists(path):
        path = os.path.abspath(path)
    return {"tokenizer": path, "tokenizer_kind": tokenizer.kind, "vocab_size": tokenizer.n_words,
            "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
            "dtype": token_dtype(tokenizer.n_words)}


class Progress:
    """Prints `label: i/n` to stderr at most every `every` seconds (silent for quick work)."""

    def __init__(self, label, total, every=2.0):
        self.label, self.total, self.every = label, total, every
        self.start = self.last = time.time()

    def update(self, i):
        now = time.time()
        if now - self.last >= self.every:
            self.last = now
            print(f"{self.label}: {i}/{self.total} ({now - self.start:.0f}s)", file=sys.stderr, flush=True)


TEXT_ONLY_META = {"tokenizer": None, "tokenizer_kind": None, "vocab_size": None, "bos_id": None, "eos_id": None,
                  "pad_id": None, "dtype": None}


def error_token(tokenizer, completion, offset, completion_tokens):
    """Index in completion_tokens (eos last) of the token where character `offset` of the completion
    starts: the length of the offset's prefix in tokens (the eos when the offset is the end)."""
    if offset >= len(completion):
        return len(completion_tokens) - 1
    head = tokenizer.encode(completion[:offset], bos=False, eos=False)
    if completion_tokens[:len(head)] == head:
        return len(head)
    for j in range(len(completion_tokens)):  # a token spans the offset: the one that contains it
        if len(tokenizer.decode(completion_tokens[:j + 1])) > offset:
            return j
    return len(completion_tokens) - 1


def write_dataset(out_dir, splits, tokenizer, tokenizer_path, verifier=None, extra_files=None, merge=False):
    """
    Tokenize `splits` ({split: [row, ...]}) and write the dataset into out_dir, atomically
    (tokenizer None: text-only, the rows and meta.json without token files).
    extra_files ({name: temp path}) are moved into out_dir in the same commit (e.g. a freshly
    trained tokenizer.model). merge=True keeps the other splits of an existing dataset in out_dir
    (e.g. CodeContests' train/valid/test prepared one at a time), which must use the same tokenizer.
    Returns (meta, stats) where stats[split] holds the numbers print_summary shows.
    """
    for split, rows in splits.items():
        if not rows:
            raise ValueError(f"split '{split}' has no rows (empty split)")
        for i, row in enumerate(rows):
            check_row(row, f"{split} row {i}")
    meta_path = os.path.join(out_dir, "meta.json")
    text_only = tokenizer is None
    meta = {**(TEXT_ONLY_META if text_only else tokenizer_meta(tokenizer, tokenizer_path, out_dir)), "splits": {},
            "verifier": verifier, "problems": {}}
    if merge and os.path.exists(meta_path):
        old = read_meta_file(meta_path)
        for key in ("vocab_size", "bos_id", "eos_id", "pad_id", "dtype"):
            if old.get(key) != meta[key]:
                given = "text-only data (no tokenizer)" if text_only else f"tokenizer {tokenizer_path}"
                raise ValueError(f"{meta_path}: field '{key}' is {old.get(key)} but {given} gives {meta[key]}: "
                                 f"prepare into another --out_dir or delete this one")
        meta["splits"] = {s: n for s, n in old["splits"].items() if s not in splits}
        meta["problems"] = {s: p for s, p in old["problems"].items() if s not in splits}
        meta["verifier"] = verifier if verifier is not None else old.get("verifier")
    dtype = None if text_only else np.dtype(meta["dtype"])

    os.makedirs(out_dir, exist_ok=True)
    temps = {}  # final name -> temp path

    def temp(name):
        temps[name] = os.path.join(out_dir, f".{name}.tmp{os.getpid()}")
        return temps[name]

    stats = {}
    try:
        for split, rows in splits.items():
            with open(temp(f"{split}.jsonl"), "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            problems = {}  # problem_id -> int, in order of first appearance
            if text_only:
                for row in rows:
                    problems.setdefault(row["problem_id"], len(problems))
                meta["splits"][split] = len(rows)
                meta["problems"][split] = list(problems)
                stats[split] = {"rows": len(rows), "problems": len(problems),
                                "correct": float(np.mean([row["is_correct"] for row in rows]))}
                continue
            idx = np.zeros((len(rows), 5), dtype=np.int64)  # offset, prompt_len, length, label, problem
            step_labels = any("first_error" in row for row in rows)
            first_error = np.full(len(rows), -1, dtype=np.int64)  # token position of the first wrong step
            offset = 0
            progress = Progress(f"tokenizing {split}", len(rows))
            with open(temp(f"{split}.bin"), "wb") as f:
                for i, row in enumerate(rows):
                    prompt = tokenizer.encode(row["prompt"], bos=True, eos=False)
                    completion = tokenizer.encode(row["completion"], bos=False, eos=True)
                    tokens = np.array(prompt + completion, dtype=np.int64)
                    assert tokens.max() < tokenizer.n_words
                    f.write(tokens.astype(dtype).tobytes())
                    problem = problems.setdefault(row["problem_id"], len(problems))
                    idx[i] = (offset, len(prompt), len(tokens), int(row["is_correct"]), problem)
                    if row.get("first_error") is not None:
                        first_error[i] = len(prompt) + error_token(tokenizer, row["completion"], row["first_error"],
                                                                   completion)
                    offset += len(tokens)
                    progress.update(i + 1)
            with open(temp(f"{split}.idx.npy"), "wb") as f:
                np.save(f, idx)
            if step_labels:
                with open(temp(f"{split}.first_error.npy"), "wb") as f:
                    np.save(f, first_error)
                meta["step_labels"] = True
            meta["splits"][split] = len(rows)
            meta["problems"][split] = list(problems)
            stats[split] = {"rows": len(rows), "problems": len(problems), "correct": float(idx[:, 3].mean()),
                            "len_min": int(idx[:, 2].min()), "len_mean": float(idx[:, 2].mean()),
                            "len_max": int(idx[:, 2].max()), "tokens": int(offset)}
        with open(temp("meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
        # commit: no meta.json while the data files change, so a crash here never looks complete
        if os.path.exists(meta_path):
            os.remove(meta_path)
        for name, path in (extra_files or {}).items():
            os.replace(path, os.path.join(out_dir, name))
        for name, path in temps.items():
            if name != "meta.json":
                os.replace(path, os.path.join(out_dir, name))
        for split in splits if text_only else ():  # token files of an earlier, tokenized preparation
            for name in (f"{split}.bin", f"{split}.idx.npy"):
                if os.path.exists(os.path.join(out_dir, name)):
                    os.remove(os.path.join(out_dir, name))
        os.replace(temps["meta.json"], meta_path)
    except BaseException:
        for path in list(temps.values()) + list((extra_files or {}).values()):
            if os.path.exists(path):
                os.remove(path)
        raise
    return meta, stats


def read_meta_file(path):
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object")
    for key in ("tokenizer", "tokenizer_kind", "vocab_size", "bos_id", "eos_id", "pad_id", "dtype", "splits",
                "problems"):
        if key not in meta:
            raise ValueError(f"{path}: missing field '{key}'")
    return meta


def print_summary(out_dir, meta, stats):
    if meta["tokenizer"] is None:
        print(f"wrote {out_dir}: text-only (no tokenizer given: no token files; eval.py encodes the prompts)")
    else:
        print(f"wrote {out_dir}: tokenizer {meta['tokenizer']} ({meta['tokenizer_kind']}, vocab {meta['vocab_size']}, "
              f"{meta['dtype']})")
    for split, s in stats.items():
        if "tokens" not in s:
            print(f"  {split:>5}: {s['rows']:7d} rows, {s['problems']:6d} problems, correct {100 * s['correct']:5.1f}%")
            continue
        print(f"  {split:>5}: {s['rows']:7d} rows, {s['problems']:6d} problems, correct {100 * s['correct']:5.1f}%, "
              f"tokens/row min {s['len_min']} mean {s['len_mean']:.1f} max {s['len_max']}, {s['tokens']:,} tokens")


# -----------------------------------------------------------------------------
# script: tokenize a folder of raw {split}.jsonl files

if __name__ == "__main__":
    from tokenizer import Tokenizer
    opts = parse_options({"in_dir": "", "tokenizer": "", "out_dir": "", "verifier": ""})
    if not opts["in_dir"] or not opts["tokenizer"]:
        fail("--in_dir and --tokenizer are required")
    out_dir = opts["out_dir"] or opts["in_dir"]
    try:
        paths = sorted(p for p in glob.glob(os.path.join(opts["in_dir"], "*.jsonl")) if "." not in
                       os.path.basename(p)[:-len(".jsonl")])  # not a code dataset's {split}.problems.jsonl
        if not paths:
            raise FileNotFoundError(f"{opts['in_dir']}: no {{split}}.jsonl files")
        splits = {os.path.basename(p)[:-len(".jsonl")]: read_jsonl(p) for p in paths}
        tok = Tokenizer(opts["tokenizer"])
        meta, stats = write_dataset(out_dir, splits, tok, opts["tokenizer"], verifier=opts["verifier"] or None,
                                    merge=True)
    except (ValueError, FileNotFoundError) as e:
        fail(e, code=1)
    print_summary(out_dir, meta, stats)
