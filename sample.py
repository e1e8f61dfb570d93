"""
Sample from a trained model, or decode greedily with the MTP heads as their own draft model.

    python sample.py --init_from=out/arith/seed1337/baseline --start="Compute: 3 + 4 * (12 - 5)"
    printf 'Compute: 2 + 3 * 4\nCompute: (7 - 2) * 3\n' > prompts.txt   # one prompt per line
    python sample.py --init_from=out/arith/seed1337/baseline/best.pt --start=FILE:prompts.txt --temperature=0
    python sample.py --init_from=/models/7B_1T_4 --start="def fib(n):" --speculative=True --max_new_tokens=256

init_from is a checkpoint file, a run directory (best.pt > final.pt > ckpt.pt), a Meta-format
directory (params.json + consolidated.pth + tokenizer.model) or a Hugging Face LLaMA directory
(config.json + *.safetensors + tokenizer.model or tokenizer.json), anything `Transformer.load` reads.

speculative=True is the self-speculative greedy decoding of the MTP paper (Gloeckle et al. 2024,
sec. 3.2): heads 1..n-1 propose the next n-1 tokens, head 0 checks all of them in one forward,
and every forward emits at least one token. The output is plain greedy decoding's, token for
token; compare=True also decodes the prompts with plain greedy and checks that the outputs match.
Timing comes after the outputs: a warm-up pass, then `repeats` timed passes of both; the speed-up
printed is the median of the repeats with its min and max.

Generation stops at the model's context (prompt + new tokens <= 2 * max_seq_len, its RoPE table):
a longer max_new_tokens is clipped, with one note.
"""

import os
import statistics
import sys
import time

import torch

import ddp_utils
from data.format import fail
from model import Transformer
from tokenizer import Tokenizer, tokenizer_file_in

# -----------------------------------------------------------------------------
# helpers shared with eval.py


def resolve_init(init_from):
    """init_from -> (path that Transformer.load reads, checkpoint file or None for a Meta dir,
    {"data": the checkpoint's data entry or {}, "stage", "iter"}). Picks a run dir's file as
    Transformer.load does."""
    from model import resolve_checkpoint
    path = resolve_checkpoint(init_from)
    if os.path.isdir(path):  # a Meta or Hugging Face directory
        stage = "meta" if os.path.isfile(os.path.join(path, "params.json")) else "hf"
        return path, None, {"data": {}, "stage": stage, "iter": None}
    ckpt = ddp_utils.load_checkpoint(path)  # memory-mapped: the weights are not read here
    return path, path, {"data": dict(ckpt.get("data") or {}), "stage": ckpt.get("stage"), "iter": ckpt.get("iter")}


def find_file(path, *dirs):
    """`path` if it exists, else the first of dir/path, dir/basename(path) that does (None otherwise).
    Checkpoints and meta.json store paths relative to where a run started; this finds them anyway."""
    if path is None:
        return None
    if os.path.exists(path):
        return path
    for d in dirs:
        for p in (os.path.join(d, path), os.path.join(d, os.path.basename(path))):
            if d and os.path.exists(p):
                return p
    return None


def clip_to_context(model, prompt_len, max_new_tokens):
    """max_new_tokens cut so that prompt + new tokens fit the positions of the model's RoPE table
    (2 * max_seq_len, model._rope): generation past them has no positions to run at. A prompt that
    leaves no room is a ValueError."""
    context = model.rope.shape[0]
    if prompt_len >= context:
        raise ValueError(f"a prompt of {prompt_len} tokens leaves no room in the model's context of {context} "
                         f"positions (2 * max_seq_len)")
    return min(max_new_tokens, context - prompt_len)


def resolve_dtype(name, device_type):
    """'auto' -> bfloat16 on a GPU that supports it, else float32."""
    if name == "auto":
        if device_type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype {name!r}: use auto, {', '.join(dtypes)}")
    return dtypes[name]


# -----------------------------------------------------------------------------
# self-speculative greedy decoding


@torch.inference_mode()
def speculative_generate(model, prompt_tokens, max_new_tokens, eos_id=None):
    """
    Greedy decoding of one prompt where heads 1..n-1 draft and head 0 verifies, one forward per step.

    Each forward runs all n heads over [t, d_1 .. d_{n-1}]: t is the last token (already chosen,
    not yet in the KV cache), d_j the drafts for the tokens after it. Head 0's argmax at input i is
    the greedy token after input i, so d_{i+1} is accepted while it equals that argmax; head 0's
    argmax after the last accepted input is the next t (the correction, or the token after a
    fully accepted draft), and heads 1..n-1 at that same input give the next drafts. Rejected
    drafts leave stale KV-cache rows beyond the accepted length; the next forward starts right
    after the accepted tokens, overwrites them, and attends only to cache[:start_pos+S].

    The output is plain greedy decoding's (`model.generate(..., temperature=0)`): an accepted
    draft is exactly the token greedy decoding picks there. (In low precision, verifying several
    positions in one matmul can round differently from one position at a time, and a near-tie in
    the logits can then flip; in fp32 this does not happen in practice.)

    Returns (new tokens cut before the first eos, stats): forwards (including the prompt's),
    tokens (new tokens decoded, incl. a final eos), mean_accepted (tokens per forward; plain
    decoding is 1.0), accepted_hist (forwards that accepted 0..n-1 drafts).
    """
    n = model.n_future_tokens
    device = model.tok_embeddings.weight.device
    P = len(prompt_tokens)
    assert P > 0, "speculative_generate needs at least one prompt token (e.g. bos)"
    stats = {"forwards": 0, "tokens": 0, "mean_accepted": 0.0, "accepted_hist": [0] * n}
    if max_new_tokens <= 0:
        return [], stats
    if P + max_new_tokens > model.rope.shape[0]:
        raise ValueError(f"prompt + max_new_tokens = {P + max_new_tokens} exceeds 2 * max_seq_len = "
                         f"{model.rope.shape[0]}")

    model.setup_cache(1, P + max_new_tokens)  # inputs never go past the last token we may emit
    try:
        logits = model.forward_cached(torch.tensor([prompt_tokens], device=device), 0, n_heads=n)  # (1, P, n, V)
        stats["forwards"] += 1
        guess = logits[0, -1].argmax(-1).tolist()  # (n,) head k's token for position P+k
        out, drafts = [guess[0]], guess[1:]  # out[-1] is chosen but not yet in the cache
        while len(out) < max_new_tokens and out[-1] != eos_id:
            feed = [out[-1]] + drafts[:max_new_tokens - len(out)]  # S <= n tokens, no draft past the limit
            start_pos = P + len(out) - 1
            logits = model.forward_cached(torch.tensor([feed], device=device), start_pos, n_heads=n)  # (1, S, n, V)
            stats["forwards"] += 1
            pred = logits[0].argmax(-1)  # (S, n): head k's token for position start_pos+i+k+1
            greedy = pred[:, 0].tolist()  # (S,) head 0: the greedy token after feed[:i+1]
            a = 0  # accepted drafts
            while a + 1 < len(feed) and feed[a + 1] == greedy[a] and feed[a + 1] != eos_id:
                a += 1
            if a + 1 < len(feed) and feed[a + 1] == greedy[a]:  # the draft after them is a correct eos: done
                out.extend(feed[1:a + 2])
                stats["accepted_hist"][a + 1] += 1
                break
            stats["accepted_hist"][a] += 1
            out.extend(feed[1:a + 1] + [greedy[a]])
            drafts = pred[a, 1:].tolist()  # (n-1,) drafts for the tokens after greedy[a]
    finally:
        model.clear_cache()

    out = out[:max_new_tokens]
    stats["tokens"] = len(out)
    stats["mean_accepted"] = len(out) / stats["forwards"]
    if eos_id is not None and eos_id in out:
        out = out[:out.index(eos_id)]
    return out, stats


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    elif str(device).startswith("mps"):
        torch.mps.synchronize()


def time_decoding(model, prompts, limits, eos_id=None, repeats=5, plain=True):
    """Wall time of speculative (and plain greedy) decoding of all prompts, after one untimed pass
    (lazy kernel and allocator set-up), `repeats` times: one timing of a few milliseconds on a
    shared machine can say 15x in one run and 0.5x in the next, a median of repeats does not.
    The two alternate which goes first, so a drift in machine load hits both alike.
    prompts: token lists; limits: max_new_tokens of each prompt.
    Returns {"repeats", "spec_s": [s per pass], "plain_s": [..] | None, "speedup": [plain/spec] | None,
    "speedup_median", "speedup_min", "speedup_max" (None without plain)}."""
    device = model.tok_embeddings.weight.device

    def one_pass(kind):
        _sync(device)
        t0 = time.perf_counter()
        for ids, limit in zip(prompts, limits):
            if kind == "spec":
                speculative_generate(model, ids, limit, eos_id)
            else:
                model.generate([ids], limit, temperature=0.0, eos_id=eos_id)
        _sync(device)
        return time.perf_counter() - t0

    kinds = ["spec", "plain"] if plain else ["spec"]
    for kind in kinds:  # warm-up
        one_pass(kind)
    times = {kind: [] for kind in kinds}
    for r in range(repeats):
        for kind in (kinds if r % 2 == 0 else kinds[::-1]):
            times[kind].append(one_pass(kind))
    t = {"repeats": repeats, "spec_s": times["spec"], "plain_s": times.get("plain"), "speedup": None,
         "speedup_median": None, "speedup_min": None, "speedup_max": None}
    if plain:
        t["speedup"] = [p / max(s, 1e-9) for p, s in zip(times["plain"], times["spec"])]
        t["speedup_median"] = statistics.median(t["speedup"])
        t["speedup_min"], t["speedup_max"] = min(t["speedup"]), max(t["speedup"])
    return t


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    init_from = "out/arith/seed1337/baseline"  # checkpoint file, run dir (best.pt > final.pt > ckpt.pt), Meta or HF dir
    tokenizer = ""  # tokenizer file; "": the checkpoint's data tokenizer, or a Meta/HF dir's own tokenizer file
    start = "Compute: 3 + 4 * (12 - 5)\n"  # prompt, or "FILE:path" with one prompt per line ("\\n" = newline)
    num_samples = 3  # samples per prompt (speculative: greedy, so one)
    max_new_tokens = 128  # new tokens per sample
    temperature = 0.8  # 0 = greedy; ignored by speculative (always greedy)
    top_k: int | None = 200  # keep the top_k logits (None = all)
    seed = 1337  # the sampling generator's seed
    device = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps
    dtype = "auto"  # auto (bfloat16 on a GPU with bf16, else float32) | float32 | bfloat16 | float16
    speculative = False  # self-speculative greedy decoding (heads 1..n-1 draft, head 0 verifies)
    compare = True  # with speculative: also run plain greedy, check equality and time both
    repeats = 5  # with speculative: timed passes over the prompts after a warm-up (median and min-max reported)
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
    # -----------------------------------------------------------------------------

    try:
        ctx = ddp_utils.setup(device)
        torch.manual_seed(seed)
        ptdtype = resolve_dtype(dtype, ctx.device_type)
        load_path, ckpt_file, info = resolve_init(init_from)
        data_info = info["data"]
        if not tokenizer:
            if ckpt_file is None:  # the directory's tokenizer.model, else its tokenizer.json
                tokenizer = tokenizer_file_in(load_path) or os.path.join(load_path, "tokenizer.model")
            else:
                tokenizer = find_file(data_info.get("tokenizer"), os.path.dirname(ckpt_file), data_info.get("dir", ""),
                                      os.path.dirname(os.path.abspath(__file__)))  # runs usually start in the repo root
                if tokenizer is None:
                    raise ValueError(f"{ckpt_file}: no usable tokenizer in the checkpoint's data entry "
                                     f"({data_info.get('tokenizer')!r}); pass --tokenizer=PATH")
        tok = Tokenizer(tokenizer)
        model = Transformer.load(load_path, device=ctx.device, dtype=ptdtype).eval()
        if tok.n_words > model.args.vocab_size:
            raise ValueError(f"tokenizer {tokenizer} has {tok.n_words} words but the model's vocab_size is "
                             f"{model.args.vocab_size}: not this model's tokenizer")
    except (FileNotFoundError, ValueError) as e:
        fail(e)

    if start.startswith("FILE:"):
        with open(start[5:], encoding="utf-8") as f:
            prompts = [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
    else:
        prompts = [start]
    n = model.n_future_tokens
    print(f"model: {load_path} ({model.num_params() / 1e6:.2f}M params, {n} heads, {ptdtype}, {ctx.device}); "
          f"tokenizer: {tokenizer}")
    encoded = [tok.encode(p, bos=True, eos=False) for p in prompts]
    try:
        limits = [clip_to_context(model, len(ids), max_new_tokens) for ids in encoded]  # new tokens per prompt
        if repeats < 1:
            raise ValueError(f"repeats={repeats}: need at least 1")
    except ValueError as e:
        fail(e)
    if min(limits) < max_new_tokens:
        print(f"note: max_new_tokens={max_new_tokens} clipped to fit the model's context: prompt + new tokens "
              f"<= {model.rope.shape[0]} positions (2 * max_seq_len)")

    if not speculative:
        gen = torch.Generator(device=ctx.device).manual_seed(seed)
        for prompt, ids, limit in zip(prompts, encoded, limits):
            outs = model.generate([ids] * num_samples, limit, temperature=temperature, top_k=top_k,
                                  eos_id=tok.eos_id, generator=gen)
            for i, new in enumerate(outs):
                print(f"---------- sample {i + 1}/{num_samples}")
                print(prompt + tok.decode(new))
        sys.exit(0)

    # speculative greedy, optionally against plain greedy on the same prompts: outputs first, then timing
    if n == 1:
        print("note: the model has one head, so there is nothing to draft with (1 token per forward)")
    totals = {"forwards": 0, "tokens": 0, "same": 0}
    hist = [0] * n
    for prompt, ids, limit in zip(prompts, encoded, limits):
        new, st = speculative_generate(model, ids, limit, tok.eos_id)
        totals["forwards"] += st["forwards"]
        totals["tokens"] += st["tokens"]
        hist = [a + b for a, b in zip(hist, st["accepted_hist"])]
        print("----------")
        print(prompt + tok.decode(new))
        line = f"[{st['tokens']} tokens in {st['forwards']} forwards: {st['mean_accepted']:.2f} tokens/forward]"
        if compare:
            plain = model.generate([ids], limit, temperature=0.0, eos_id=tok.eos_id)[0]
            totals["same"] += plain == new
            line += " identical to plain greedy" if plain == new else " DIFFERS from plain greedy"
            if plain != new:
                first = next((i for i, (a, b) in enumerate(zip(plain, new)) if a != b), min(len(plain), len(new)))
                line += f" from new token {first} (plain: {tok.decode(plain[first:first + 8])!r})"
        print(line)

    print("==========")
    mean_acc = totals["tokens"] / max(totals["forwards"], 1)
    print(f"speculative: {totals['tokens']} tokens, {totals['forwards']} forwards, mean accepted "
          f"{mean_acc:.3f} tokens/forward, drafts accepted per forward (0..{n - 1}): {hist}")
    t = time_decoding(model, encoded, limits, tok.eos_id, repeats, plain=compare)
    spec_s = statistics.median(t["spec_s"])
    if not compare:
        print(f"time: speculative {spec_s:.3f} s per pass over the prompts (median of {repeats} after a warm-up, "
              f"min {min(t['spec_s']):.3f}, max {max(t['spec_s']):.3f}) on {ctx.device} ({ptdtype})")
    else:
        print(f"time: speculative {spec_s:.3f} s, plain greedy {statistics.median(t['plain_s']):.3f} s per pass "
              f"over the prompts (medians of {repeats} after a warm-up) on {ctx.device} ({ptdtype})")
        print(f"speed-up {t['speedup_median']:.2f}x (median of {repeats} repeats; min {t['speedup_min']:.2f}x, "
              f"max {t['speedup_max']:.2f}x); identical outputs: {totals['same']}/{len(prompts)}")
        if totals["same"] != len(prompts):
            print("warning: speculative and plain greedy differ (near-tied logits in low precision? "
                  "try --dtype=float32)")
