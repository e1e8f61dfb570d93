"""
Export any stage's checkpoint as a Meta-format directory that Meta's own MTP loader (and
`Transformer.from_pretrained`) reads as-is (format='meta', the default), or as a Hugging Face
LLaMA directory (format='hf', below):

    out_dir/consolidated.pth   Meta's keys only (no value head, no optimizer), contiguous, in `dtype`
    out_dir/params.json        Meta's fields: dim, n_layers, n_heads, n_kv_heads, vocab_size,
                               multiple_of, ffn_dim_multiplier, norm_eps, rope_theta, n_future_tokens
    out_dir/tokenizer.model    the run's tokenizer file, copied byte for byte
    out_dir/value_head.pth     only when the checkpoint has a critic: ValueHead.state_dict(), keys
                               without the `value_head.` prefix (norm.weight, fc1.weight, fc1.bias,
                               fc2.weight, fc2.bias), always float32. Meta's loader never reads it.

format='hf': trunk + head 0 as the standard LLaMA that `transformers.LlamaForCausalLM.from_pretrained`
loads (its logits are head 0's), and the rest beside it for this repo's loader:

    out_dir/config.json              LlamaForCausalLM's config (untied embeddings, rope_theta/rope_scaling)
    out_dir/model.safetensors        trunk + head 0 with HF's key names and q/k row order, in `dtype`
    out_dir/wmtp_heads.safetensors   heads 1..n-1 (extra_heads.*, this repo's names) and the value head
                                     (value_head.*, float32), when there are any; transformers ignores it
    out_dir/tokenizer.model or tokenizer.json (+ tokenizer_config.json, special_tokens_map.json): the
                                     run's tokenizer files, copied

`Transformer.load(out_dir)` reads such a directory back with all its heads. The source may also be
a Hugging Face directory (e.g. to convert it to Meta's format).

Usage (from any directory):

    python export.py --init_from=out/arith/seed1337/verifiable_td --out_dir=out/export/verifiable_td  # a run dir
    python export.py --init_from=out/arith/seed1337/critic/final.pt --out_dir=out/export/critic --dtype=float32
    python export.py --init_from=out/export/verifiable_td --out_dir=out/export/td-fp16 --dtype=float16  # a Meta dir
    python export.py --init_from=out/arith/seed1337/baseline --out_dir=out/export/baseline-hf --format=hf  # transformers

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
import hf
from model import ModelArgs, Transformer, ValueHead, meta_weights_path, resolve_checkpoint
from tokenizer import Tokenizer, tokenizer_file_in

# -----------------------------------------------------------------------------
# settings: python export.py [config.py] [--key=value ...]
init_from = "out/arith/seed1337/baseline"  # checkpoint file, run dir (best.pt > final.pt > ckpt.pt), Meta or HF dir
out_dir = "out/export"  # the directory to write
format = "meta"  # 'meta': params.json + consolidated.pth (Meta's MTP loader) | 'hf': LlamaForCausalLM directory
dtype = "bfloat16"  # 'bfloat16' (Meta's release dtype) | 'float32' | 'float16'; the value head stays float32
tokenizer: str | None = None  # file to copy; None: the checkpoint's data.tokenizer (a Meta dir: its own); '': none
overwrite = False  # replace an existing non-empty out_dir
# -----------------------------------------------------------------------------


def read_source(src: str):
    """-> (state dict without value head, ModelArgs, value head state dict or None, info dict).
    Tensors are memory-mapped, not read, so a 7B checkpoint costs no extra RAM here."""
    if os.path.isdir(src) and not os.path.isfile(os.path.join(src, "params.json")):  # a Hugging Face directory
        params, state_dict, value_head = hf.read_dir(src)
        info = {"stage": "hf", "iter": None, "tokenizer": tokenizer_file_in(src)}
        return state_dict, ModelArgs.from_dict(params, source=src), value_head or None, info
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
    """params.json with exactly Meta's field names (see the module docstring for what is left out).
    A LLaMA-3.1-scaled RoPE adds Meta's `use_scaled_rope` and this repo's `rope_scaling` (its values)."""
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
              "vocab_size": args.vocab_size, "multiple_of": args.multiple_of,
              "ffn_dim_multiplier": args.ffn_dim_multiplier, "norm_eps": args.norm_eps,
              "rope_theta": args.rope_theta, "n_future_tokens": args.n_future_tokens}
    if args.rope_scaling:
        params.update(use_scaled_rope=True, rope_scaling=dict(args.rope_scaling))
    return params


def tokenizer_files(tok: Tokenizer) -> dict:
    """{name in the export: source file}: a tokenizer.model as tokenizer.model; a Hugging Face
    tokenizer.json as tokenizer.json with the files beside it that name its special tokens."""
    if tok.kind != "tokenizers":
        return {"tokenizer.model": tok.path}
    files = {"tokenizer.json": tok.path}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(os.path.dirname(os.path.abspath(tok.path)), name)
        if os.path.isfile(path):
            files[name] = path
    return files


def write_hf(out: str, consolidated: dict, args: ModelArgs, value_head, torch_dtype, tok) -> int:
    """model.safetensors (trunk + head 0 in HF's layout), wmtp_heads.safetensors (heads 1..n-1 and the
    value head, this repo's names) and config.json into `out`; returns the number of HF tensors."""
    from safetensors.torch import save_file
    trunk_and_head0 = {k: v for k, v in consolidated.items() if not k.startswith("extra_heads.")}
    hf_sd = hf.to_hf_state_dict(trunk_and_head0, args)
    save_file(hf_sd, os.path.join(out, hf.WEIGHTS_FILE), metadata={"format": "pt"})
    heads = {k: v for k, v in consolidated.items() if k.startswith("extra_heads.")}
    heads.update({f"value_head.{k}": to_compact(v, torch.float32) for k, v in (value_head or {}).items()})
    if heads:
        save_file(heads, os.path.join(out, hf.HEADS_FILE), metadata={"format": "pt"})
    config = hf.config_from_args(args, torch_dtype, tok.bos_id if tok else None, tok.eos_id if tok else None)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return len(hf_sd)


def export_checkpoint(ckpt_path: str, out_dir: str, dtype="bfloat16", tokenizer_path=None,
                      overwrite: bool = False, format: str = "meta") -> str:
    """Write the Meta-format (format='meta') or Hugging Face (format='hf') directory of a checkpoint
    file, run dir, Meta dir or HF dir; returns out_dir. tokenizer_path: None = the checkpoint's
    data.tokenizer (a Meta or HF dir: its own); '' = export without a tokenizer."""
    if format not in ("meta", "hf"):
        raise ValueError(f"format {format!r}: use 'meta' or 'hf'")
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
    tok = None
    if tok_path:
        if not os.path.isfile(tok_path):
            raise FileNotFoundError(f"tokenizer {tok_path} not found (pass --tokenizer=path, or --tokenizer='' "
                                    f"to export without one)")
        tok = Tokenizer(tok_path)
        if format == "meta" and tok.n_words != args.vocab_size:
            raise ValueError(f"tokenizer {tok_path} has {tok.n_words} words but the model's vocab_size is "
                             f"{args.vocab_size}; Meta's loader sizes the model from the tokenizer, so they must agree")
        if tok.n_words > args.vocab_size:
            raise ValueError(f"tokenizer {tok_path} has {tok.n_words} words but the model's vocab_size is only "
                             f"{args.vocab_size}: not this model's tokenizer")
    else:
        print(f"warning: no tokenizer for {src}; {out_dir} will have no tokenizer file")
    tok_files = tokenizer_files(tok) if tok else {}
    n_hf_tensors = 0

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
        if format == "hf":
            n_hf_tensors = write_hf(tmp, consolidated, args, value_head, torch_dtype, tok)
        else:
            torch.save(consolidated, os.path.join(tmp, "consolidated.pth"))
            with open(os.path.join(tmp, "params.json"), "w") as f:
                json.dump(meta_params(args), f)
            if value_head is not None:
                torch.save({k: to_compact(v, torch.float32) for k, v in value_head.items()},
                           os.path.join(tmp, "value_head.pth"))
        for name, path in tok_files.items():
            shutil.copyfile(path, os.path.join(tmp, name))
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
    dtype_name = str(torch_dtype).replace("torch.", "")
    n_params = sum(v.numel() for v in consolidated.values()) / 1e6
    for fname in written:
        size = os.path.getsize(os.path.join(out_dir, fname)) / 2**20
        what = {"consolidated.pth": f"{len(consolidated)} tensors, {dtype_name}, {n_params:.2f}M params",
                "params.json": json.dumps(meta_params(args)),
                "value_head.pth": f"{len(value_head or {})} tensors, float32 (keys without 'value_head.')",
                "config.json": "LlamaForCausalLM config (trunk + head 0)",
                hf.WEIGHTS_FILE: f"{n_hf_tensors} tensors, {dtype_name}, trunk + head 0 (HF names)",
                hf.HEADS_FILE: f"{args.n_future_tokens - 1} extra heads, {'a' if value_head else 'no'} value head "
                               f"(float32), this repo's names",
                }.get(fname, f"copy of {tok_files.get(fname)}")
        print(f"  {fname:<23} {size:9.2f} MiB  {what}")
    return out_dir


if __name__ == "__main__":
    from data.format import fail
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
    try:
        export_checkpoint(init_from, out_dir, dtype, tokenizer, overwrite, format)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        fail(e)
