"""
Evaluate any stage's checkpoint on held-out problems: generate, verify, report, write eval.json.

    python eval.py --init_from=out/arith_baseline                      # run dir: best.pt > final.pt > ckpt.pt
    python eval.py --init_from=out/arith_rho1/final.pt --n_problems=200 --num_samples=16 --pass_k=[1,4,16]
    python eval.py --init_from=/models/7B_1T_4 --data_dir=data/codecontests --split=test --out=eval_meta.json

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
"""

import contextlib
import importlib
import json
import math
import os
import sys
import time

import numpy as np
import torch

from evaluation import eval_sums
from weighting import auc, binary_accuracy

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
    """The unique problems of a split in file order: [(problem_id, prompt)], the first n_problems."""
    path = os.path.join(data_dir, f"{split}.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (prepare the data first, e.g. python data/arith/prepare.py)")
    problems = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                problems.setdefault(row["problem_id"], row["prompt"])
    items = list(problems.items())
    return items if n_problems is None else items[:n_problems]


def check_vocab(model, tok, meta, ckpt_data=None):
    """Raise a one-line ValueError when the model, the data's tokenizer and the data disagree."""
    from data.loader import check_tokenizer
    check_tokenizer(meta, tok)
    if tok.n_words > model.args.vocab_size:
        raise ValueError(f"the data's tokenizer has {tok.n_words} words but the model's vocab_size is "
                         f"{model.args.vocab_size}: this model was not trained with this tokenizer")
    if ckpt_data and ckpt_data.get("vocab_size") not in (None, meta["vocab_size"]):
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


@torch.no_grad()
def evaluate(model, tokenizer, data_dir, split="test", n_problems=None, batch_size=32, max_new_tokens=256,
             num_samples=8, temperature=1.0, top_k=None, pass_k=(1, 4, 8), seed=1337, log_interval=10,
             n_examples=3):
    """Generate, verify and score one split; returns the metrics dict that eval.json holds
    (no settings). Runs in one process on the model's device."""
    from data.loader import TokenDataset, collate, load_meta
    from sample import clip_to_context
    model.eval()
    device = model.tok_embeddings.weight.device
    meta = load_meta(data_dir)
    tok = tokenizer
    notes, timings = [], {}
    problems = load_problems(data_dir, split, n_problems)
    prompts = [tok.encode(p, bos=True, eos=False) for _, p in problems]  # [bos] prompt, as in the token data
    # one limit for every prompt, in every batch: prompt + new tokens must fit the model's context
    longest = max(map(len, prompts), default=1)
    limit = clip_to_context(model, longest, max_new_tokens)
    if limit < max_new_tokens:
        notes.append(f"max_new_tokens={max_new_tokens} clipped to {limit}: the longest prompt ({longest} tokens) + "
                     f"new tokens must fit the model's context of {model.rope.shape[0]} positions (2 * max_seq_len)")

    verify = None
    if meta.get("verifier"):
        verify = importlib.import_module(f"data.{meta['verifier']}.verify").verify
    else:
        notes.append("no verifier in meta.json: generations are not checked, pass@k skipped")
    verifier_errors = 0

    def check(prompt, completion):
        nonlocal verifier_errors
        try:
            return bool(verify(prompt, completion))
        except Exception:  # a completion the verifier cannot even parse is wrong, not a crash
            verifier_errors += 1
            return False

    m = {"pass@1_greedy": None, "pass@1_sampled": None, "pass@k": {}}
    counts = {"problems": len(problems)}
    examples = []

    # --- greedy --------------------------------------------------------------------------
    t0 = time.time()
    greedy, counts["greedy_hit_max_new_tokens"] = generate_batched(
        model, prompts, "greedy", batch_size, limit, 0.0, None, tok.eos_id, None, log_interval)
    timings["greedy_s"] = time.time() - t0
    greedy_text = [tok.decode(g) for g in greedy]
    greedy_ok = [None] * len(problems)
    if verify is not None:
        greedy_ok = [check(p, c) for (_, p), c in zip(problems, greedy_text)]
        counts["greedy_correct"] = sum(greedy_ok)
        m["pass@1_greedy"] = sum(greedy_ok) / max(len(problems), 1)
    for (pid, p), c, ok in list(zip(problems, greedy_text, greedy_ok))[:n_examples]:
        examples.append({"problem_id": pid, "prompt": p, "greedy": c, "correct": ok})

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
            ok = [check(problems[i // num_samples][1], tok.decode(s)) for i, s in enumerate(sampled)]
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

    # --- per-head loss and accuracy, value head, on the split's token data ------------------
    t0 = time.time()
    ds = TokenDataset(data_dir, split, max_length=model.args.max_seq_len, overflow="truncate")
    rows = list(range(len(ds)))
    if n_problems is not None:  # the same problems as the generations
        ids = {pid: i for i, pid in enumerate(meta["problems"][split])}
        wanted = {ids[pid] for pid, _ in problems}
        rows = [i for i in rows if ds[i]["problem"] in wanted]
    n_batches = math.ceil(len(rows) / batch_size)

    def batches():
        for b in range(n_batches):
            yield collate([ds[i] for i in rows[b * batch_size:(b + 1) * batch_size]], meta["pad_id"])
            _progress("token data", b + 1, n_batches, t0, log_interval)

    sums, _, v, y = eval_sums(model, batches(), device, contextlib.nullcontext(),
                                           value=model.value_head is not None)
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

    m.update(counts=counts, timings=timings, examples=examples, notes=notes)
    return m


def write_json_atomic(path, obj):
    """Temp file in the same folder, fsync, os.replace: a crash never leaves half a file."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
    for note in m["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    init_from = "out/arith_baseline"  # checkpoint file, run dir (best.pt > final.pt > ckpt.pt), Meta or HF dir
    data_dir = "data/arith"  # prepared dataset (meta.json names the tokenizer and the verifier)
    split = "test"  # which split's problems and token data
    n_problems = None  # None = every problem of the split, else the first n_problems
    batch_size = 32  # prompts per generate() call, rows per loss batch
    max_new_tokens = 256  # generation limit per completion
    num_samples = 8  # sampled completions per problem (0 = greedy only)
    temperature = 1.0  # sampling temperature of the sampled completions
    top_k = None  # None = sample from the full distribution
    pass_k = [1, 4, 8]  # k of the reported pass@k (each needs k <= num_samples)
    seed = 1337  # sampling seed
    device = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps
    dtype = "auto"  # auto (bfloat16 on a GPU with bf16, else float32) | float32 | bfloat16 | float16
    out = ""  # eval.json path; "" = next to the checkpoint (<run dir>/eval.json)
    log_interval = 10  # a progress line on stderr every this many batches (0 = quiet)
    wandb_log = False  # also send the numbers to wandb (WANDB_MODE=offline works)
    wandb_project = "wmtp"
    wandb_run_name = ""  # "" = eval-<run dir name>
    exec(open("configurator.py").read())  # overrides from the command line or a config file
    settings = {k: v for k, v in globals().items() if not k.startswith("_")
                and isinstance(v, (bool, int, float, str, type(None), list, tuple))}
    # -----------------------------------------------------------------------------

    import ddp_utils
    from data.format import fail
    from data.loader import load_meta
    from model import Transformer
    from sample import resolve_dtype, resolve_init
    from tokenizer import Tokenizer

    try:
        if os.environ.get("RANK") not in (None, "0") or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("eval.py runs in one process: start it with python, not torchrun")
        ctx = ddp_utils.setup(device)
        ptdtype = resolve_dtype(dtype, ctx.device_type)
        load_path, ckpt_file, ckpt_info = resolve_init(init_from)
        meta = load_meta(data_dir)
        tok_path = meta["tokenizer"]  # resolved by load_meta (relative to data_dir when inside it)
        tok = Tokenizer(tok_path)
        model = Transformer.load(load_path, device=ctx.device, dtype=ptdtype).eval()
        check_vocab(model, tok, meta, ckpt_info.get("data"))
        if split not in meta["splits"]:
            raise ValueError(f"{data_dir} has no split {split!r} (has {', '.join(meta['splits'])})")
    except (FileNotFoundError, ValueError, KeyError) as e:
        fail(e)
    out_path = out or os.path.join(os.path.dirname(ckpt_file) if ckpt_file else load_path, "eval.json")
    print(f"evaluating {ckpt_file or load_path} ({model.num_params() / 1e6:.2f}M params, {model.n_future_tokens} "
          f"heads, value head: {model.value_head is not None}, {ptdtype}, {ctx.device}) on {data_dir} {split}")

    t_start = time.time()
    try:
        metrics = evaluate(model, tok, data_dir, split=split, n_problems=n_problems, batch_size=batch_size,
                           max_new_tokens=max_new_tokens, num_samples=num_samples, temperature=temperature,
                           top_k=top_k, pass_k=pass_k, seed=seed, log_interval=log_interval)
    except ValueError as e:  # e.g. a prompt longer than the model's context
        fail(e)
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
