"""
Hugging Face LLaMA directories in and out: the one place that knows HF's names.

A directory written by `LlamaForCausalLM.save_pretrained` (Llama 2/3, CodeLlama, TinyLlama, SmolLM,
...) holds `config.json`, the weights as `model.safetensors` or shards named by
`model.safetensors.index.json`, and a tokenizer (`tokenizer.model` and/or `tokenizer.json`).
This file turns them into what this repo's model reads (a params.json-style dict for
`ModelArgs.from_dict` and a state dict with Meta's key names) and back (export.py --format=hf).
`Transformer.from_hf` builds the model from them.

What differs between the two layouts:
- key names: `model.layers.{i}.self_attn.q_proj` is Meta's `layers.{i}.attention.wq`, ... (HF_TO_META)
- the rows of wq and wk: HF's converter permutes them so that RoPE can rotate the two halves of a
  head (`rotate_half`) instead of adjacent pairs (Meta's complex multiply); `to_meta_rotary_rows`
  undoes that permutation, `to_hf_rotary_rows` redoes it.
- the FFN width: HF states `intermediate_size`, Meta derives it from `multiple_of` and
  `ffn_dim_multiplier`; `params_from_config` picks values that give exactly intermediate_size.
- tied embeddings (`tie_word_embeddings`): HF then stores only the embedding. This repo keeps
  `output` and `tok_embeddings` as two weights, so a tied source is untied on load: `output`
  starts as a copy of the embedding and the two train separately. An export is always untied.
- heads: an HF LLaMA has one (next-token) head. An export of an MTP model writes trunk + head 0
  as the standard LLaMA, and heads 1..n-1 (plus a value head) beside it in HEADS_FILE, with
  this repo's key names; transformers never reads that file, this repo's loader does.

Checkpoints are untrusted input: only json and safetensors are read (no pickle, no remote code).
"""

import json
import os
import re

import torch

HEADS_FILE = "wmtp_heads.safetensors"  # extra heads (extra_heads.*) and value head (value_head.*) of an export
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"

# HF key (with {i} for the layer) -> Meta key
HF_TO_META = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
}
META_TO_HF = {meta: hf for hf, meta in HF_TO_META.items()}
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size")


def is_hf_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def read_config(path: str) -> dict:
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{config_path}: not a readable config.json ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: not a JSON object")
    return config


# -----------------------------------------------------------------------------
# config.json <-> ModelArgs

def rope_scaling_from_config(config: dict, source: str):
    """(rope_theta, llama3 scaling dict or None) from either config.json layout: transformers < 5
    writes `rope_theta` and `rope_scaling`, transformers >= 5 one `rope_parameters` dict."""
    scaling = config.get("rope_parameters") or config.get("rope_scaling") or {}
    field = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
    theta = scaling.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"{source}: {field}.rope_type={rope_type!r} is not supported (only 'default' and 'llama3')")
    missing = [k for k in LLAMA3_ROPE_KEYS if k not in scaling]
    if missing == ["original_max_position_embeddings"]:  # transformers falls back to this one
        scaling = {**scaling, "original_max_position_embeddings": config.get("max_position_embeddings")}
    elif missing:
        raise ValueError(f"{source}: {field} of rope_type 'llama3' lacks {missing}")
    return theta, {"rope_type": "llama3", **{k: scaling[k] for k in LLAMA3_ROPE_KEYS}}


def check_supported(config: dict, source: str):
    """One-line ValueError naming the first field of an architecture this model does not compute
    (it would load without complaint and give other outputs)."""
    def refuse(field, why):
        raise ValueError(f"{source}: {field}={config.get(field)!r}: {why}; only plain LLaMA "
                         f"(LlamaForCausalLM) checkpoints are supported")

    if config.get("model_type") != "llama":
        refuse("model_type", "not 'llama'")
    archs = config.get("architectures") or ["LlamaForCausalLM"]
    if not any(a.lower() == "llamaforcausallm" for a in archs):
        refuse("architectures", "not LlamaForCausalLM")
    if config.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "this model's FFN is SwiGLU (silu)")
    for field in ("attention_bias", "mlp_bias"):
        if config.get(field):
            refuse(field, "this model's linear layers have no bias")
    if config.get("sliding_window") is not None:
        refuse("sliding_window", "this model attends to every earlier token")
    for field in MOE_FIELDS:
        if config.get(field):
            refuse(field, "mixture-of-experts layers are not supported")
    if config.get("quantization_config") is not None:
        refuse("quantization_config", "quantized weights are not supported")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        refuse("partial_rotary_factor", "RoPE rotates the whole head here")
    dim, n_heads, head_dim = config.get("hidden_size"), config.get("num_attention_heads"), config.get("head_dim")
    if head_dim is not None and dim and n_heads and head_dim * n_heads != dim:
        refuse("head_dim", "must be hidden_size / num_attention_heads here")


def params_from_config(config: dict, source: str = "config.json") -> dict:
    """config.json -> a params.json-style dict (ModelArgs.from_dict) for the source's one head.
    ValueError naming the field for an architecture this model cannot compute."""
    check_supported(config, source)
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(config.get(field), int) or config[field] <= 0:
            raise ValueError(f"{source}: {field}={config.get(field)!r} must be a positive integer")
    dim, hidden = config["hidden_size"], config["intermediate_size"]
    # Meta's rule: multiple_of * ceil(int(ffn_dim_multiplier * int(8 * dim / 3)) / multiple_of). With
    # multiple_of = intermediate_size it gives exactly that whenever the inner value is in (0, hidden]
    llama2_hidden = int(2 * (4 * dim) / 3)
    theta, rope_scaling = rope_scaling_from_config(config, source)
    return {
        "dim": dim,
        "n_layers": config["num_hidden_layers"],
        "n_heads": config["num_attention_heads"],
        "n_kv_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
        "vocab_size": config["vocab_size"],
        "multiple_of": hidden,
        "ffn_dim_multiplier": None if llama2_hidden <= hidden else hidden / llama2_hidden,
        "norm_eps": config.get("rms_norm_eps", 1e-6),
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "n_future_tokens": 1,
        # the context it was trained for (eval.py truncates there); the RoPE table covers twice that
        "max_seq_len": config.get("max_position_embeddings", 2048),
    }


def config_from_args(args, torch_dtype: torch.dtype, bos_id=None, eos_id=None) -> dict:
    """config.json of the standard LLaMA made of the trunk and head 0 (`args`: a ModelArgs)."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers - args.n_future_tokens + 1,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        # transformers < 5 reads rope_theta and rope_scaling; >= 5 converts them to rope_parameters
        "rope_theta": args.rope_theta,
        "rope_scaling": dict(args.rope_scaling) if args.rope_scaling else None,
        "max_position_embeddings": args.max_seq_len,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "dtype": str(torch_dtype).replace("torch.", ""),  # transformers < 4.56 called it torch_dtype
    }
    if bos_id is not None:
        config["bos_token_id"] = bos_id
    if eos_id is not None:
        config["eos_token_id"] = eos_id
    return config


# -----------------------------------------------------------------------------
# weights

def to_meta_rotary_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's q/k row permutation: within each head, HF's rows [0..hd/2) and [hd/2..hd) (the
    halves rotate_half pairs up) go back to Meta's adjacent pairs (2i, 2i+1). (out, in) -> (out, in)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def to_hf_rotary_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's permute of convert_llama_weights_to_hf.py: Meta's adjacent pairs -> HF's halves."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def meta_key(hf_key: str):
    """HF key -> Meta key, or None for a key this model has no weight for."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_key)
    if m:
        pattern = HF_TO_META.get(f"model.layers.{{i}}.{m.group(2)}")
        return pattern.format(i=m.group(1)) if pattern else None
    return HF_TO_META.get(hf_key)


def hf_key(meta_key_: str) -> str:
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", meta_key_)
    if m:
        return META_TO_HF[f"layers.{{i}}.{m.group(2)}"].format(i=m.group(1))
    return META_TO_HF[meta_key_]


def weight_files(path: str) -> list:
    """The safetensors files of an HF directory: the shards of model.safetensors.index.json, or
    model.safetensors. PyTorch .bin files are pickles (loading them can run code): not read."""
    index_path = os.path.join(path, WEIGHTS_INDEX)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map") or {}
        return [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    if os.path.isfile(os.path.join(path, WEIGHTS_FILE)):
        return [os.path.join(path, WEIGHTS_FILE)]
    raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX} (pytorch_model.bin files are pickles "
                            f"and are not read: save the model with safetensors)")


def read_state_dict(path: str, params: dict, tied: bool) -> dict:
    """The weights of an HF directory with Meta's key names, memory-mapped from the safetensors
    files (nothing is read until used) in their stored dtype. Copies are made only where the
    layout differs: wq and wk (rows permuted back) and, for tied embeddings, `output`."""
    from safetensors import safe_open
    state_dict, unknown = {}, []
    for file in weight_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():
                name = meta_key(key)
                if name is None:
                    if not key.endswith("rotary_emb.inv_freq"):  # a buffer old transformers versions saved
                        unknown.append(key)
                    continue
                if tied and name == "output.weight":
                    continue  # some tied checkpoints store lm_head too; tied means the embedding
                tensor = f.get_tensor(key)  # memory-mapped, copy-on-write: the file never changes
                if name.endswith("attention.wq.weight"):
                    tensor = to_meta_rotary_rows(tensor, params["n_heads"])
                elif name.endswith("attention.wk.weight"):
                    tensor = to_meta_rotary_rows(tensor, params["n_kv_heads"])
                state_dict[name] = tensor
    if unknown:
        raise ValueError(f"{path}: weights this LLaMA model does not have: {unknown[:8]}"
                         f"{' ...' if len(unknown) > 8 else ''}")
    if tied and "tok_embeddings.weight" in state_dict:
        state_dict["output.weight"] = state_dict["tok_embeddings.weight"].clone()  # untied: trained separately
    return state_dict


def read_heads(path: str) -> dict:
    """HEADS_FILE of an export (extra_heads.* and value_head.*, this repo's key names), {} if none."""
    heads_path = os.path.join(path, HEADS_FILE)
    if not os.path.isfile(heads_path):
        return {}
    from safetensors import safe_open
    with safe_open(heads_path, framework="pt", device="cpu") as f:
        heads = {k: f.get_tensor(k) for k in f.keys()}
    bad = [k for k in heads if not k.startswith(("extra_heads.", "value_head."))]
    if bad:
        raise ValueError(f"{heads_path}: keys other than extra_heads.* and value_head.*: {bad[:8]}")
    return heads


def read_dir(path: str):
    """An HF directory -> (params dict for ModelArgs.from_dict, state dict with Meta's keys: trunk,
    head 0 and the extra heads of HEADS_FILE, value head state dict without the 'value_head.'
    prefix, {} if none). Tensors memory-mapped as in read_state_dict."""
    config = read_config(path)
    params = params_from_config(config, source=os.path.join(path, "config.json"))
    state_dict = read_state_dict(path, params, tied=bool(config.get("tie_word_embeddings")))
    heads = read_heads(path)
    n_extra = len({k.split(".")[1] for k in heads if k.startswith("extra_heads.")})
    params["n_layers"] += n_extra  # trunk + head 0 in layers, heads 1..n-1 in extra_heads
    params["n_future_tokens"] += n_extra
    state_dict.update({k: v for k, v in heads.items() if k.startswith("extra_heads.")})
    value_head = {k[len("value_head."):]: v for k, v in heads.items() if k.startswith("value_head.")}
    return params, state_dict, value_head


def to_hf_state_dict(state_dict: dict, args) -> dict:
    """Trunk + head 0 of a Meta-key state dict (no extra heads, no value head) -> HF's names and
    q/k row order. Tensors other than wq and wk are passed through (not copied)."""
    hf_sd = {}
    for name, tensor in state_dict.items():
        if name.endswith("attention.wq.weight"):
            tensor = to_hf_rotary_rows(tensor, args.n_heads).contiguous()
        elif name.endswith("attention.wk.weight"):
            tensor = to_hf_rotary_rows(tensor, args.n_kv_heads).contiguous()
        hf_sd[hf_key(name)] = tensor
    return hf_sd
