"""
Export any stage's checkpoint as a Meta-format directory that Meta's own MTP loader (and
`Transformer.from_pretrained`) reads as-is:

    out_dir/consolidated.pth   Meta's keys only (no value head, no optimizer), contiguous, in `dtype`
    out_dir/params.json        Meta's fields: dim, n_layers, n_heads, n_kv_heads, vocab_size,
                               multiple_of, ffn_dim_multiplier, norm_eps, rope_theta, n_future_tokens
    out_dir/tokenizer.model    the run's tokenizer file, copied byte for byte
    out_dir/value_head.pth     only when the checkpoint has a critic: ValueHead.state_dict(), keys
                               without the `value_head.` prefix (norm.weight, fc1.weight, fc1.bias,
                               fc2.weight, fc2.bias), always float32. Meta's loader never reads it.

Usage (from any directory):

    python export.py --ckpt=out-verifiable --out_dir=export/verifiable   # a run dir: best.pt > final.pt > ckpt.pt
    python export.py --ckpt=out-critic/final.pt --out_dir=export/critic --dtype=float32
    python export.py --ckpt=export/verifiable --out_dir=export/verifiable-fp16 --dtype=float16   # re-export a Meta dir

Loading an export again, value head included:

    from model import Transformer
    model = Transformer.load("export/verifiable", dtype=torch.bfloat16)   # picks up value_head.pth

params.json has no max_seq_len / max_batch_size: Meta's loader passes both as keyword arguments
next to **params (a duplicate would be a TypeError), and Meta's 7B_1T_4 params.json has neither.
vocab_size is written as the real size; Meta's loader replaces it with the tokenizer's n_words,
which is why the export checks that the two agree.

The export is written into a temp folder next to out_dir and renamed into place at the end, so
an interrupted export never leaves a half-written out_dir. An existing non-empty out_dir is
refused unless overwrite=True.
"""

import json
import os
import shutil

import torch

import ddp_utils
from model import ModelArgs, Tokenizer, Transformer, ValueHead, meta_weights_path, resolve_checkpoint

# -----------------------------------------------------------------------------
# settings: python export.py [config.py] [--key=value ...]
ckpt = "out"  # checkpoint file, run dir (best.pt > final.pt > ckpt.pt, as Transformer.load), or Meta dir
out_dir = "out-meta"  # the Meta-format directory to write
dtype = "bfloat16"  # 'bfloat16' (Meta's release dtype) | 'float32' | 'float16'; the value head stays float32
tokenizer: str | None = None  # file to copy; None: the checkpoint's data.tokenizer (a Meta dir: its own); '': none
overwrite = False  # replace an existing non-empty out_dir
# -----------------------------------------------------------------------------


def read_source(src: str):
    """-> (state dict without value head, ModelArgs, value head state dict or None, info dict).
    Tensors are memory-mapped, not read, so a 7B checkpoint costs no extra RAM here."""
    if os.path.isdir(src):  # a Meta directory (e.g. an earlier export, re-exported in another dtype)
        with open(os.path.join(src, "params.json")) as f:
            params = json.load(f)
        pth = meta_weights_path(src)
        state_dict = ddp_utils.load_weights(pth)
        if params.get("vocab_size", -1) in (-1, None):
            params["vocab_size"] = state_dict["tok_embeddings.weight"].shape[0]
        vh_path = os.path.join(src, "value_head.pth")
        value_head = ddp_utils.load_weights(vh_path, mmap=False) if os.path.isfile(vh_path) else None
        tok_path = os.path.join(src, "tokenizer.model")
        info = {"stage": "meta", "iter": None, "tokenizer": tok_path if os.path.isfile(tok_path) else None}
        return state_dict, ModelArgs.from_dict(params, source=src), value_head, info

    ckpt = ddp_utils.load_checkpoint(src)  # weights only: opening it never runs code from it
    state_dict = {k: v for k, v in ckpt["model"].items() if not k.startswith("value_head.")}
    value_head = {k[len("value_head."):]: v for k, v in ckpt["model"].items() if k.startswith("value_head.")}
    tok_path = (ckpt.get("data") or {}).get("tokenizer")
    if tok_path and not os.path.isabs(tok_path) and not os.path.exists(tok_path):  # relative to where the run
        tok_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), tok_path)  # started, usually the repo root
    info = {"stage": ckpt.get("stage"), "iter": ckpt.get("iter"), "tokenizer": tok_path}
    return state_dict, ModelArgs(**ckpt["model_args"]), value_head or None, info


def check_state_dict(state_dict: dict, expected: dict, source: str):
    """Exactly the expected keys with the expected shapes, or a one-line error naming them."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{source}: keys do not match Meta's layout for these model args: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    bad = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state_dict.items()
           if v.shape != expected[k].shape]
    if bad:
        raise ValueError(f"{source}: shapes do not match the model args: {bad[:4]}")


def to_compact(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fresh contiguous copy in `dtype` that owns exactly its own storage (torch.save writes a
    view's whole storage, so a slice of a bigger tensor would otherwise bloat the file)."""
    return t.detach().to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)


def meta_params(args: ModelArgs) -> dict:
    """params.json with exactly Meta's field names (see the module docstring for what is left out)."""
    return {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
            "vocab_size": args.vocab_size, "multiple_of": args.multiple_of,
            "ffn_dim_multiplier": args.ffn_dim_multiplier, "norm_eps": args.norm_eps,
            "rope_theta": args.rope_theta, "n_future_tokens": args.n_future_tokens}


def export_checkpoint(ckpt_path: str, out_dir: str, dtype="bfloat16", tokenizer_path=None,
                      overwrite: bool = False) -> str:
    """Write the Meta-format directory of a checkpoint file, run dir or Meta dir; returns out_dir.
    tokenizer_path: None = the checkpoint's data.tokenizer (a Meta dir: its tokenizer.model);
    '' = export without a tokenizer."""
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else {
        "bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}.get(dtype)
    if torch_dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise ValueError(f"dtype {dtype!r}: use 'bfloat16', 'float32' or 'float16'")
    if not out_dir.strip():  # abspath('') would be the current directory
        raise ValueError("out_dir is empty: give the Meta-format directory to write, e.g. --out_dir=export/run1")
    src = resolve_checkpoint(ckpt_path)
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"out_dir {out_dir} exists and is not a directory")
    refuse = f"out_dir {out_dir} exists and is not empty; pass overwrite=True (--overwrite=True) to replace it"
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(refuse)
    src_dir = os.path.abspath(src if os.path.isdir(src) else os.path.dirname(src))
    if os.path.commonpath([src_dir, out_dir]) == out_dir:
        raise ValueError(f"out_dir {out_dir} holds the checkpoint being exported ({src}); pick another out_dir")

    state_dict, args, value_head, info = read_source(src)
    with torch.device("meta"):  # shapes only, no memory: the exact key set Meta's loader expects
        expected = Transformer(args).state_dict()
        expected_vh = ValueHead(args.dim, args.norm_eps).state_dict()
    check_state_dict(state_dict, expected, src)
    if value_head is not None:
        check_state_dict(value_head, expected_vh, f"{src} (value head)")

    tok_path = info["tokenizer"] if tokenizer_path is None else tokenizer_path
    if tok_path:
        if not os.path.isfile(tok_path):
            raise FileNotFoundError(f"tokenizer {tok_path} not found (pass --tokenizer=path, or --tokenizer='' "
                                    f"to export without one)")
        n_words = Tokenizer(tok_path).n_words
        if n_words != args.vocab_size:
            raise ValueError(f"tokenizer {tok_path} has {n_words} words but the model's vocab_size is "
                             f"{args.vocab_size}; Meta's loader sizes the model from the tokenizer, so they must agree")
    else:
        print(f"warning: no tokenizer for {src}; {out_dir} will have no tokenizer.model")

    consolidated = {}
    for k in expected:  # Meta's key order
        tensor = state_dict[k]
        if k in ("tok_embeddings.weight", "output.weight"):  # vocab padding (pad_vocab_multiple) stays behind
            tensor = tensor[:args.vocab_size]
        consolidated[k] = to_compact(tensor, torch_dtype)
        if torch_dtype == torch.float16 and not torch.isfinite(consolidated[k]).all():
            raise ValueError(f"{k}: values overflow float16 (max 65504); export as bfloat16 or float32")

    # write everything into a temp folder next to out_dir, then rename it into place
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        torch.save(consolidated, os.path.join(tmp, "consolidated.pth"))
        with open(os.path.join(tmp, "params.json"), "w") as f:
            json.dump(meta_params(args), f)
        if value_head is not None:
            torch.save({k: to_compact(v, torch.float32) for k, v in value_head.items()},
                       os.path.join(tmp, "value_head.pth"))
        if tok_path:
            shutil.copyfile(tok_path, os.path.join(tmp, "tokenizer.model"))
        written = sorted(os.listdir(tmp))
        for fname in written:  # on disk before the rename makes the export visible
            with open(os.path.join(tmp, fname), "rb") as f:
                os.fsync(f.fileno())
        if os.path.isdir(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)
        if os.path.isdir(out_dir):  # the old export goes only once the new one is complete
            if not overwrite:  # something wrote into out_dir while we were exporting
                raise FileExistsError(refuse)
            old = os.path.join(parent, f".{name}.old.{os.getpid()}")
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    print(f"exported {src} (stage {info['stage']}, iter {info['iter']}) to {out_dir}:")
    for fname in written:
        size = os.path.getsize(os.path.join(out_dir, fname)) / 2**20
        what = {"consolidated.pth": f"{len(consolidated)} tensors, {str(torch_dtype).replace('torch.', '')}, "
                                    f"{sum(v.numel() for v in consolidated.values()) / 1e6:.2f}M params",
                "params.json": json.dumps(meta_params(args)),
                "value_head.pth": f"{len(value_head or {})} tensors, float32 (keys without 'value_head.')",
                "tokenizer.model": f"copy of {tok_path}"}[fname]
        print(f"  {fname:<17} {size:9.2f} MiB  {what}")
    return out_dir


if __name__ == "__main__":
    import sys
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
    try:
        export_checkpoint(ckpt, out_dir, dtype, tokenizer, overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"export.py: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        sys.exit(2)
