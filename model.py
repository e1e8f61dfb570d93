"""
LLaMA-2 style decoder with Meta's multi-token prediction (MTP) layout, in plain PyTorch.

The module names equal the keys of Meta's released MTP checkpoints (e.g. 7B_1T_4), so loading
one is a single strict load_state_dict:

    tok_embeddings -> layers[:-1] (shared trunk) -> h_trunk
                      h_trunk -> layers[-1]      -> head 0 (predicts token t+1)
                      h_trunk -> extra_heads[j]  -> head j+1 (predicts token t+j+2)
    every head -> the shared norm -> the shared output projection

References: Touvron et al. 2023 (LLaMA-2), Gloeckle et al. 2024 ("Better & Faster Large Language
Models via Multi-token Prediction"). The memory-efficient training step (forward_backward) is
the paper's sequential head backward: the n heads' (B, S, V) logits never exist at once.
"""

import copy
import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import ddp_utils  # load_weights / load_checkpoint: the one place a file is unpickled (weights only)
import hf
from tokenizer import Tokenizer

# which file of a run directory Transformer.load picks
CHECKPOINT_PREFERENCE = ("best.pt", "final.pt", "ckpt.pt")


def resolve_checkpoint(path: str) -> str:
    """What Transformer.load reads for `path`: a Meta directory (params.json) or a Hugging Face
    directory (config.json) as is, a run directory's best.pt > final.pt > ckpt.pt, or the file
    itself. One-line FileNotFoundError otherwise."""
    if os.path.isdir(path) and (os.path.isfile(os.path.join(path, "params.json")) or hf.is_hf_dir(path)):
        return path
    if os.path.isdir(path):
        found = [os.path.join(path, n) for n in CHECKPOINT_PREFERENCE if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise FileNotFoundError(f"{path}: neither a Meta directory (params.json), a Hugging Face directory "
                                    f"(config.json) nor a run directory ({', '.join(CHECKPOINT_PREFERENCE)})")
        return found[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    return path


def flops_per_token(args: "ModelArgs", seq_len: int, n_trainable_blocks: int, n_outputs: int,
                    forward_block_only: bool = False) -> int:
    """Model FLOPs of one training step per token, every head counted (PaLM appendix B style).
    A block's forward: 2 * its matmul weights + 4 * seq_len * dim (QK^T and AV; causal masking not
    discounted). Trainable blocks cost 3x forward (backward = 2x); frozen blocks forward only (with a
    frozen trunk nothing below needs a gradient). Each of the n_outputs heads' output projection:
    3 * 2 * dim * vocab_size. Not counted: norms, RoPE, softmax, chunked CE's logit recompute, vocab
    padding (its columns are not model FLOPs)."""
    d = args.dim
    p_block = 2 * d * d + 2 * d * args.n_kv_heads * args.head_dim + 3 * d * args.ffn_hidden_dim
    fwd_block = 2 * p_block + 4 * seq_len * d
    if forward_block_only:
        return fwd_block
    n_blocks = args.n_layers
    return ((n_blocks - n_trainable_blocks) * fwd_block + 3 * n_trainable_blocks * fwd_block
            + 3 * n_outputs * 2 * d * args.vocab_size)


def meta_weights_path(meta_dir: str) -> str:
    """consolidated.pth (or a single-shard consolidated.00.pth) of a Meta-format directory."""
    for name in ("consolidated.pth", "consolidated.00.pth"):
        if os.path.isfile(os.path.join(meta_dir, name)):
            return os.path.join(meta_dir, name)
    raise FileNotFoundError(f"{meta_dir}: no consolidated.pth in this directory")


@dataclass
class ModelArgs:
    # field names are those of Meta's params.json
    dim: int = 4096
    n_layers: int = 32  # total blocks: trunk + n_future_tokens heads
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None -> n_heads (MHA); fewer -> grouped-query attention
    vocab_size: int = -1  # -1: take it from the tokenizer / the embedding (LLaMA-2 convention)
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    n_future_tokens: int = 1
    max_seq_len: int = 2048  # RoPE table covers 2 * max_seq_len positions, as in Meta's code
    # LLaMA-3.1's long-context RoPE, as Hugging Face's config.json states it: {"rope_type": "llama3",
    # "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}; None: plain
    # RoPE. Meta's params.json says "use_scaled_rope": true for Meta's values (META_LLAMA3_ROPE_SCALING)
    rope_scaling: Optional[dict] = None
    # not in Meta's params.json: embedding and output rows rounded up to a multiple of this, so the
    # output matmul has tensor-core friendly shapes; the padded ids' logits are -inf (never
    # predicted, zero gradient) and export.py drops the rows. 1: exactly vocab_size rows.
    pad_vocab_multiple: int = 1

    @classmethod
    def from_dict(cls, d: dict, source: str = "params") -> "ModelArgs":
        """Build from a params.json dict; keys this model does not use are ignored with a warning."""
        known = {f.name for f in fields(cls)}
        ignored = sorted(k for k in d if k not in known and k not in ("max_batch_size", "use_scaled_rope"))
        if ignored:
            warnings.warn(f"{source}: ignoring keys this model does not use: {ignored}")
        d = dict(d)
        if d.get("use_scaled_rope") and not d.get("rope_scaling"):  # Meta's LLaMA-3.1 params.json
            d["rope_scaling"] = dict(META_LLAMA3_ROPE_SCALING)
        return cls(**{k: v for k, v in d.items() if k in known})

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim={self.dim}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}: "
                             "dim must divide by n_heads and n_heads by n_kv_heads")
        if not 1 <= self.n_future_tokens <= self.n_layers:
            raise ValueError(f"n_future_tokens={self.n_future_tokens} must be in [1, n_layers={self.n_layers}]")
        if not isinstance(self.pad_vocab_multiple, int) or self.pad_vocab_multiple < 1:
            raise ValueError(f"pad_vocab_multiple={self.pad_vocab_multiple!r} must be an integer >= 1")
        if self.rope_scaling is not None:
            r = self.rope_scaling
            keys = ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            if (not isinstance(r, dict) or r.get("rope_type") != "llama3" or any(k not in r for k in keys)
                    or not r["high_freq_factor"] > r["low_freq_factor"]):
                raise ValueError(f"rope_scaling={r!r}: use None or a dict of {keys} with rope_type 'llama3' "
                                 f"and high_freq_factor > low_freq_factor")

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and the output projection: vocab_size rounded up to pad_vocab_multiple."""
        m = self.pad_vocab_multiple
        return m * ((self.vocab_size + m - 1) // m)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """LLaMA-2's rule: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


# Meta's LLaMA-3.1 values (llama3's apply_scaling), what "use_scaled_rope": true in params.json means
META_LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}


# -----------------------------------------------------------------------------
# building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32, return in the input dtype, then scale (Meta's order of operations)
        x_normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return x_normed.type_as(x) * self.weight


def llama3_scaled_freqs(freqs: torch.Tensor, scaling: dict) -> torch.Tensor:
    """LLaMA-3.1's RoPE scaling (Meta's apply_scaling = HF's _compute_llama3_parameters): frequencies
    whose wavelength exceeds original_max_position_embeddings / low_freq_factor are divided by
    `factor`, those shorter than original / high_freq_factor are kept, and those between are
    interpolated smoothly between the two. freqs: (head_dim/2,) fp32 -> (head_dim/2,) fp32."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / factor, freqs)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def precompute_freqs_cis(head_dim: int, end: int, theta: float = 10000.0,
                         rope_scaling: Optional[dict] = None) -> torch.Tensor:
    """Meta's complex rotation table: freqs_cis[p, i] = exp(1j * p * f_i), (end, head_dim/2), with
    f_i = theta^(-2i/head_dim), LLaMA-3.1-scaled when rope_scaling is given (ModelArgs.rope_scaling)."""
    # always on the CPU in fp32 (also when the model itself is being built on the meta device)
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device="cpu")[: head_dim // 2].float() / head_dim))
    if rope_scaling is not None:
        freqs = llama3_scaled_freqs(freqs, rope_scaling)
    t = torch.arange(end, dtype=torch.float32, device="cpu")
    freqs = torch.outer(t, freqs)  # (end, head_dim/2)
    return torch.polar(torch.ones_like(freqs), freqs)  # complex64


def apply_rotary_emb(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by the angle of freqs_cis, as Meta's complex multiply does.

    x: (B, S, H, hd); rope: (S, hd/2, 2) or (B, S, hd/2, 2) holding (cos, sin) = view_as_real(freqs_cis).
    Real arithmetic instead of complex tensors so torch.compile and bf16 autocast handle it.
    """
    xf = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, S, H, hd/2, 2)
    if rope.dim() == 3:
        rope = rope[None]  # (1, S, hd/2, 2)
    cos, sin = rope[:, :, None, :, 0], rope[:, :, None, :, 1]  # (B|1, S, 1, hd/2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)  # (B, S, H, hd/2, 2)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.n_rep = self.n_heads // self.n_kv_heads
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        self.cache_k = self.cache_v = None  # (B, T_max, n_kv_heads, hd) while generating

    def forward(self, x, rope, mask=None, start_pos: int = 0):
        """x: (B, S, dim). mask: None for plain causal attention over x, else a bool tensor
        broadcastable to (B, 1, S, T) (True = attend) over the T = start_pos + S cached keys."""
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, S, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, S, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, rope), apply_rotary_emb(k, rope)
        if self.cache_k is not None:
            self.cache_k[:B, start_pos:start_pos + S] = k
            self.cache_v[:B, start_pos:start_pos + S] = v
            k, v = self.cache_k[:B, :start_pos + S], self.cache_v[:B, :start_pos + S]  # (B, T, n_kv, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|n_kv, S|T, hd)
        # grouped-query attention: query head h reads kv head h // n_rep. enable_gqa lets flash
        # attention read the shared kv heads directly (no n_rep-fold copies of k and v to save)
        gqa = self.n_rep > 1
        if mask is None:
            assert k.shape[2] == S, "mask=None means causal attention without a cache offset"
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = nn.Linear(args.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, rope, mask=None, start_pos: int = 0):
        h = x + self.attention(self.attention_norm(x), rope, mask, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class ValueHead(nn.Module):
    """Critic: one scalar per position from the trunk output, kept and computed in fp32.
    Not part of Meta's checkpoints; its keys live under `value_head.`."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm = RMSNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, 1)

    def forward(self, h):  # (B, S, dim) -> (B, S) float32
        with torch.autocast(h.device.type, enabled=False):
            x = self.norm(h.float()).float()
            x = F.silu(F.linear(x, self.fc1.weight.float(), self.fc1.bias.float()))
            return F.linear(x, self.fc2.weight.float(), self.fc2.bias.float()).squeeze(-1)


# -----------------------------------------------------------------------------
# cross-entropy against the shared output projection, chunked over tokens

class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """ce[i] = logsumexp(h[i] @ W.T) - (h[i] @ W.T)[target[i]], without keeping the (N, V) logits.

    Forward walks over chunks of tokens and keeps only the log-sum-exp per token; backward
    recomputes each chunk's logits (one extra matmul) to form softmax - onehot. Targets < 0 give 0.
    Columns from vocab_size on (vocab padding) are set to -inf: probability 0, gradient 0.
    `saved` is autograd's per-call context (what torch's docs call ctx; here ctx is the run's
    device/rank context).
    """

    @staticmethod
    def forward(saved, h, weight, targets, chunk_size, vocab_size):
        # h: (N, D) in the compute dtype; weight: (Vp, D) parameter; targets: (N,) long
        w = weight.to(h.dtype)
        N = h.shape[0]
        ce = torch.empty(N, dtype=torch.float32, device=h.device)
        lse = torch.empty(N, dtype=torch.float32, device=h.device)
        for s in range(0, N, chunk_size):
            logits = (h[s:s + chunk_size] @ w.t()).float()  # (c, Vp)
            logits[:, vocab_size:] = float("-inf")
            t = targets[s:s + chunk_size]
            lse_c = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
            ce[s:s + chunk_size] = torch.where(t >= 0, lse_c - picked, 0.0)
            lse[s:s + chunk_size] = lse_c
        saved.save_for_backward(h, weight, targets, lse)
        saved.chunk_size, saved.vocab_size = chunk_size, vocab_size
        return ce

    @staticmethod
    def backward(saved, grad_ce):
        h, weight, targets, lse = saved.saved_tensors
        w = weight.to(h.dtype)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        c = saved.chunk_size
        for s in range(0, h.shape[0], c):
            t = targets[s:s + c]
            logits = (h[s:s + c] @ w.t()).float()  # (c, Vp)
            logits[:, saved.vocab_size:] = float("-inf")
            dlogits = torch.exp(logits - lse[s:s + c, None])  # softmax
            dlogits.scatter_add_(1, t.clamp(min=0)[:, None], -torch.ones_like(dlogits[:, :1]))
            g = torch.where(t >= 0, grad_ce[s:s + c].float(), 0.0)  # (c,)
            dlogits = (dlogits * g[:, None]).to(h.dtype)
            grad_h[s:s + c] = dlogits @ w
            grad_w += (dlogits.t() @ h[s:s + c]).float()
        return grad_h, grad_w.to(weight.dtype), None, None, None


def _compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a Linear would compute in here: the autocast dtype when autocast is on."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


# -----------------------------------------------------------------------------
# the model

class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, value_head: bool = False):
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError("ModelArgs.vocab_size must be set (> 0) to build a model")
        self.args = args
        self.n_future_tokens = args.n_future_tokens
        n_trunk_plus_head0 = args.n_layers - args.n_future_tokens + 1
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(n_trunk_plus_head0))
        self.extra_heads = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_future_tokens - 1))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.value_head = ValueHead(args.dim, args.norm_eps) if value_head else None
        # RoPE table as (cos, sin) in fp32; a plain attribute (not a buffer) so .to(bf16) never rounds it
        self.rope = torch.view_as_real(precompute_freqs_cis(args.head_dim, 2 * args.max_seq_len, args.rope_theta,
                                                            args.rope_scaling))
        self._vocab_bias = None  # (Vp,) 0 for real ids, -inf for padded ones; built on first use
        self._set_vocab_rows(args.padded_vocab_size)  # after the unpadded constructors: same random draws
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            rows = module.weight
            if module is self.tok_embeddings or module is self.output:  # padded rows stay 0 and the
                nn.init.zeros_(rows)  # random draws are those of an unpadded model (same seed, same init)
                rows = rows[:self.args.vocab_size]
            nn.init.normal_(rows, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def pad_vocab(self, multiple: int) -> "Transformer":
        """Re-lay the embedding and output rows for args.pad_vocab_multiple = multiple (real rows
        kept, new padded rows 0). Call before the optimizer is built: the parameters are replaced."""
        self.args = dataclasses.replace(self.args, pad_vocab_multiple=multiple)
        self._set_vocab_rows(self.args.padded_vocab_size)
        return self

    def _set_vocab_rows(self, rows: int):
        """Give the embedding and the output `rows` rows: the first vocab_size kept, the rest 0."""
        V = self.args.vocab_size
        for module in (self.tok_embeddings, self.output):
            w = module.weight
            if w.shape[0] != rows:
                new = torch.zeros(rows, w.shape[1], dtype=w.dtype, device=w.device)
                new[:V] = w.detach()[:V]
                module.weight = nn.Parameter(new, requires_grad=w.requires_grad)
        self.tok_embeddings.num_embeddings = self.output.out_features = rows
        self._vocab_bias = None

    def set_n_future_tokens(self, n: int) -> "Transformer":
        """Give the model n heads. New heads start as copies of head 0 (for a plain LLaMA: its last
        block), so head 0's logits stay exactly those of the source; n below the current number
        keeps heads 0..n-1. Call before the optimizer is built: blocks are added or removed."""
        old = self.n_future_tokens
        self.args = dataclasses.replace(self.args, n_layers=self.args.n_layers + n - old, n_future_tokens=n)
        for _ in range(n - old):
            self.extra_heads.append(copy.deepcopy(self.layers[-1]))  # own weights (a copy), trained separately
        del self.extra_heads[n - 1:]
        self.n_future_tokens = n
        return self

    def add_value_head(self):
        """Attach a freshly initialised fp32 value head (e.g. after loading a Meta checkpoint)."""
        device = self.tok_embeddings.weight.device
        self.value_head = ValueHead(self.args.dim, self.args.norm_eps).to(device)
        self.value_head.apply(self._init_weights)
        return self

    def heads(self) -> list:
        """The n prediction heads in order: head k predicts token t+k+1."""
        return [self.layers[-1], *self.extra_heads]

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def logits(self, h):
        """The shared output projection: normed h (..., dim) -> logits (..., padded_vocab_size) in the
        compute dtype. Padded ids get -inf as the matmul's bias (one addmm, no separate masking pass)."""
        if self.args.padded_vocab_size == self.args.vocab_size:
            return self.output(h)
        w = self.output.weight
        if self._vocab_bias is None or self._vocab_bias.device != w.device:
            self._vocab_bias = torch.zeros(self.args.padded_vocab_size, device=w.device)
            self._vocab_bias[self.args.vocab_size:] = float("-inf")
        return F.linear(h, w, self._vocab_bias.to(_compute_dtype(h.device.type, w.dtype)))

    def _rope(self, device, start_pos: int, seqlen: int, positions=None):
        if self.rope.device != device:
            self.rope = self.rope.to(device)
        if positions is not None:  # per-row positions (B, S), for left-padded batched generation
            return self.rope[positions]  # (B, S, hd/2, 2)
        if start_pos + seqlen > self.rope.shape[0]:
            raise ValueError(f"position {start_pos + seqlen} exceeds 2 * max_seq_len = {self.rope.shape[0]}")
        return self.rope[start_pos:start_pos + seqlen]  # (S, hd/2, 2)

    # --- forward passes -------------------------------------------------------------------

    def trunk_forward(self, tokens, start_pos: int = 0, mask=None, positions=None):
        """tokens (B, S) -> h_trunk (B, S, dim): embeddings and the shared trunk layers[:-1]."""
        h = self.tok_embeddings(tokens)
        rope = self._rope(tokens.device, start_pos, tokens.shape[1], positions)
        for layer in self.layers[:-1]:
            h = layer(h, rope, mask, start_pos)
        return h

    def head_forward(self, h_trunk, k: int, start_pos: int = 0, mask=None, positions=None):
        """h_trunk (B, S, dim) -> head k's normed hidden state (B, S, dim), input of the shared output."""
        rope = self._rope(h_trunk.device, start_pos, h_trunk.shape[1], positions)
        return self.norm(self.heads()[k](h_trunk, rope, mask, start_pos))

    def forward(self, tokens, return_all_heads: bool = False):
        """Meta's reference forward (start position 0, no cache): (B, S) -> float logits (B, S, 1|n, V)."""
        h_trunk = self.trunk_forward(tokens)
        n_use = self.n_future_tokens if return_all_heads else 1
        latents = [self.heads()[k](h_trunk, self._rope(tokens.device, 0, tokens.shape[1])) for k in range(n_use)]
        h = self.norm(torch.stack(latents, dim=-2))  # (B, S, n_use, dim)
        return self.logits(h).float()[..., :self.args.vocab_size]  # (B, S, n_use, V)

    def value(self, h_trunk):
        """Value head: h_trunk (B, S, dim) -> V (B, S) float32, the estimate of R after token t."""
        if self.value_head is None:
            raise RuntimeError("this model has no value head (build it with value_head=True)")
        return self.value_head(h_trunk)

    # --- training ------------------------------------------------------------------------

    def head_cross_entropy(self, hk, tokens, k: int, ce_chunk_size: int = 0):
        """Per-position CE of head k: hk (B, S, dim) normed head output -> ce (B, S) float32,
        ce[b, t] against tokens[b, t+k+1]; 0 where t+k+1 >= S. ce_chunk_size=0: plain logits."""
        B, S = tokens.shape
        targets = torch.full_like(tokens, -1)
        targets[:, :S - k - 1] = tokens[:, k + 1:]  # (B, S), -1 = no target
        if ce_chunk_size and ce_chunk_size > 0:
            h = hk.reshape(B * S, -1).to(_compute_dtype(hk.device.type, hk.dtype))
            ce = _ChunkedLinearCrossEntropy.apply(h, self.output.weight, targets.reshape(-1), ce_chunk_size,
                                                  self.args.vocab_size)
            return ce.view(B, S)
        logits = self.logits(hk).float()  # (B, S, Vp), padded ids at -inf
        ce = F.cross_entropy(logits.view(B * S, -1), targets.view(-1), ignore_index=-1, reduction="none")
        return ce.view(B, S)

    def forward_backward(self, tokens, head_loss: Callable, h_trunk=None, extra_loss=None, naive: bool = False,
                         ce_chunk_size: int = 0):
        """One micro-step's backward of  mean over heads k of head_loss(k, ce_k)  (+ extra_loss).

        head_loss(k, ce_k) -> scalar is the training script's loss of head k, written there:
          ce_k (B, S) float32 is head k's cross-entropy at every position t against tokens[b, t+k+1]
          (0 where t+k+1 >= S); the script weights it and divides by its normaliser (e.g. the
          step's target count of head k), so nothing here rescales.
        extra_loss: a scalar built on h_trunk (e.g. value_coef * value MSE), added to the loss.

        naive=False is the MTP paper's sequential head backward: trunk forward, d = h_trunk
        detached, per head forward+backward into d.grad (so only one head's logits live at a
        time), then one trunk backward with the accumulated d.grad. naive=True backpropagates the
        sum of all heads at once; both give the same gradients.
        Returns the n head_loss values (n,) detached (no host sync).
        """
        n = self.n_future_tokens
        if h_trunk is None:
            h_trunk = self.trunk_forward(tokens)
        trunk_needs_grad = h_trunk.requires_grad
        head_input = h_trunk if naive else h_trunk.detach().requires_grad_(trunk_needs_grad)

        head_losses, naive_total = [], 0.0
        for k in range(n):
            hk = self.head_forward(head_input, k)  # (B, S, dim)
            loss_k = head_loss(k, self.head_cross_entropy(hk, tokens, k, ce_chunk_size))  # scalar
            head_losses.append(loss_k.detach())
            if naive:
                naive_total = naive_total + loss_k / n
            elif loss_k.requires_grad:
                (loss_k / n).backward()  # frees head k's graph and logits; d.grad accumulates

        if naive:
            total = naive_total + (extra_loss if extra_loss is not None else 0.0)
            if torch.is_tensor(total) and total.requires_grad:
                total.backward()
        else:
            roots, grads = [], []
            if trunk_needs_grad and head_input.grad is not None:
                roots.append(h_trunk)
                grads.append(head_input.grad)
            if extra_loss is not None and extra_loss.requires_grad:
                roots.append(extra_loss)
                grads.append(None)
            if roots:
                torch.autograd.backward(roots, grads)  # one trunk backward for all heads (+ value loss)
        return torch.stack(head_losses)

    @torch.no_grad()
    def head_cross_entropies(self, tokens, ce_chunk_size: int = 0):
        """Every head's CE without gradients, one head's logits at a time: tokens (B, S) -> (B, S, n)
        float32, [b, t, k] against tokens[b, t+k+1] (0 past the end). Rho-1's reference losses."""
        h = self.trunk_forward(tokens)
        return torch.stack([self.head_cross_entropy(self.head_forward(h, k), tokens, k, ce_chunk_size)
                            for k in range(self.n_future_tokens)], dim=-1)

    def set_trainable(self, trainable: str) -> list:
        """Freeze everything but `trainable` and return the trainable parameters.
        'all': every weight (value head included if present); 'heads': the n head blocks plus the
        shared norm and output (the trunk and embeddings frozen, as in the 7B runs); 'value_head':
        the critic only; 'heads+value_head': both. An unknown part is a ValueError."""
        head0 = f"layers.{len(self.layers) - 1}."
        groups = {
            "all": lambda name: True,
            "heads": lambda name: name.startswith(("extra_heads.", "norm.", "output.", head0)),
            "value_head": lambda name: name.startswith("value_head."),
        }
        parts = trainable.split("+")
        if any(p not in groups for p in parts):
            raise ValueError(f"trainable={trainable!r}: use 'all', 'heads', 'value_head' or 'heads+value_head'")
        params = []
        for name, p in self.named_parameters():
            p.requires_grad_(any(groups[g](name) for g in parts))
            if p.requires_grad:
                params.append(p)
        return params

    def configure_optimizer(self, weight_decay: float, learning_rate: float, betas: tuple, device_type: str):
        """AdamW over the parameters that train; weight decay on matrices only (not norms, biases);
        the fused kernel on CUDA. Call after set_trainable (and after any sharding, which swaps in
        new parameter objects)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")

    @torch.no_grad()
    def head_eval_sums(self, tokens, targets_mask, h_trunk=None):
        """Validation sums per head, one head's logits at a time: tokens (B, S), targets_mask
        (B, S, n) (1 where head k at position t has a target) -> (ce_sum, n_targets, n_top1_correct),
        each (n,) float64 (float32 on MPS, which has no float64). Sums, not means, so ranks and
        batches reduce exactly."""
        if h_trunk is None:
            h_trunk = self.trunk_forward(tokens)
        B, S = tokens.shape
        acc = torch.float32 if tokens.device.type == "mps" else torch.float64
        ce_sum, count, correct = [], [], []
        for k in range(self.n_future_tokens):
            logits = self.logits(self.head_forward(h_trunk, k)).float()[:, : S - k - 1]  # (B, S-k-1, Vp)
            target = tokens[:, k + 1:]  # (B, S-k-1)
            m = targets_mask[:, : S - k - 1, k].to(acc)
            ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # (B, S-k-1)
            ce_sum.append((ce.to(acc) * m).sum())
            count.append(m.sum())
            correct.append(((logits.argmax(-1) == target).to(acc) * m).sum())
        return torch.stack(ce_sum), torch.stack(count), torch.stack(correct)

    # --- inference with a KV cache ----------------------------------------------------------

    def setup_cache(self, batch_size: int, max_len: int):
        """Allocate a KV cache in every block (trunk and all heads)."""
        p = self.tok_embeddings.weight
        for block in [*self.layers, *self.extra_heads]:
            shape = (batch_size, max_len, self.args.n_kv_heads, self.args.head_dim)
            block.attention.cache_k = torch.zeros(shape, device=p.device, dtype=p.dtype)
            block.attention.cache_v = torch.zeros(shape, device=p.device, dtype=p.dtype)

    def clear_cache(self):
        for block in [*self.layers, *self.extra_heads]:
            block.attention.cache_k = block.attention.cache_v = None

    def forward_cached(self, tokens, start_pos: int, n_heads: int = 1, mask=None, positions=None):
        """Incremental forward over the cache: tokens (B, S) at positions start_pos..start_pos+S-1
        -> float logits (B, S, n_heads, V). Heads beyond n_heads are not run (their caches go stale).
        mask: bool (B|1, 1, S, start_pos+S), True = attend; default: causal over the cache."""
        B, S = tokens.shape
        if mask is None:
            T = start_pos + S
            mask = torch.ones(S, T, dtype=torch.bool, device=tokens.device).tril(diagonal=start_pos)[None, None]
        h_trunk = self.trunk_forward(tokens, start_pos, mask, positions)
        latents = [self.heads()[k](h_trunk, self._rope(tokens.device, start_pos, S, positions), mask, start_pos)
                   for k in range(n_heads)]
        h = self.norm(torch.stack(latents, dim=-2))  # (B, S, n_heads, dim)
        return self.logits(h).float()[..., :self.args.vocab_size]  # (B, S, n_heads, V)

    @torch.inference_mode()
    def generate(self, prompts: list, max_new_tokens: int, temperature: float = 0.0, top_k: Optional[int] = None,
                 eos_id: Optional[int] = None, generator: Optional[torch.Generator] = None) -> list:
        """Batched generation with a KV cache. prompts: list of token-id lists (different lengths are
        left-padded; each row keeps its own RoPE positions, so rows do not affect each other).
        temperature 0 = greedy. Returns the new tokens of each row, cut before the first eos."""
        device = self.tok_embeddings.weight.device
        B, lens = len(prompts), [len(p) for p in prompts]
        P, T = max(lens), max(lens) + max_new_tokens
        if T > self.rope.shape[0]:
            raise ValueError(f"prompt + max_new_tokens = {T} exceeds 2 * max_seq_len = {self.rope.shape[0]}")
        pad = torch.tensor([P - n for n in lens], device=device)  # (B,) left padding per row
        tokens = torch.zeros(B, P, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            tokens[i, P - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        steps = torch.arange(T, device=device)
        positions = (steps[None, :] - pad[:, None]).clamp(min=0)  # (B, T) RoPE position of each slot
        key_ok = steps[None, :] >= pad[:, None]  # (B, T) real (non-pad) slots
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        # pad query rows attend to themselves only, so softmax never sees an empty row
        mask = (causal[None] & key_ok[:, None, :]) | torch.eye(T, dtype=torch.bool, device=device)[None]  # (B, T, T)

        self.setup_cache(B, T)
        try:
            out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
            done = torch.zeros(B, dtype=torch.bool, device=device)
            logits = self.forward_cached(tokens, 0, 1, mask[:, None, :P, :P], positions[:, :P])[:, -1, 0]
            n_out = 0
            for i in range(max_new_tokens):
                nxt = sample_next(logits, temperature, top_k, generator)  # (B,)
                out[:, i] = nxt
                n_out = i + 1
                if eos_id is not None:
                    done |= nxt == eos_id
                    if bool(done.all()):
                        break
                if i + 1 == max_new_tokens:
                    break
                pos = P + i
                logits = self.forward_cached(nxt[:, None], pos, 1, mask[:, None, pos:pos + 1, :pos + 1],
                                             positions[:, pos:pos + 1])[:, -1, 0]
        finally:
            self.clear_cache()
        result = []
        for row in out[:, :n_out].tolist():
            if eos_id is not None and eos_id in row:
                row = row[:row.index(eos_id)]
            result.append(row)
        return result

    # --- loading ----------------------------------------------------------------------------

    def load_weights(self, state_dict: dict, source: str = "checkpoint", allow_missing_value_head: bool = True,
                     assign: bool = False, shape_hint: str = "checkpoint is from another model shape"):
        """Strict load with a one-line error naming missing/unexpected keys and shape mismatches.
        A checkpoint without `value_head.*` keys loads into a model with a fresh value head.
        assign=True replaces the parameters (a model built on the meta device) instead of copying."""
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict and not (allow_missing_value_head and k.startswith("value_head."))]
        unexpected = [k for k in state_dict if k not in own]
        if missing or unexpected:
            raise ValueError(f"{source}: state dict does not match the model: missing keys {missing[:8]}"
                             f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                             f"{' ...' if len(unexpected) > 8 else ''}")
        bad = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state_dict.items() if v.shape != own[k].shape]
        if bad:
            raise ValueError(f"{source}: {shape_hint}: {bad[:4]}")
        self.load_state_dict(state_dict, strict=not allow_missing_value_head, assign=assign)

    @classmethod
    def from_pretrained(cls, path: str, device="cpu", dtype=torch.bfloat16, value_head: Optional[bool] = False,
                        max_seq_len: Optional[int] = None) -> "Transformer":
        """Load a Meta-format directory: params.json + consolidated.pth (+ tokenizer.model).
        Keys must match exactly (one-line error naming them otherwise). Weights end up in `dtype`.
        A value head (fp32) comes from the directory's value_head.pth (written by export.py) when
        there is one and value_head is True or None; else value_head=True creates a fresh one."""
        params_path = os.path.join(path, "params.json")
        if not os.path.isfile(params_path):
            raise FileNotFoundError(f"{params_path}: not found (a Meta-format directory needs params.json)")
        with open(params_path) as f:
            params = json.load(f)
        ckpt_path = meta_weights_path(path)
        state_dict = ddp_utils.load_weights(ckpt_path)
        if params.get("vocab_size", -1) in (-1, None):
            tok_path = os.path.join(path, "tokenizer.model")
            params["vocab_size"] = (Tokenizer(tok_path).n_words if os.path.isfile(tok_path)
                                    else state_dict["tok_embeddings.weight"].shape[0])
        if max_seq_len is not None:
            params["max_seq_len"] = max_seq_len
        args = ModelArgs.from_dict(params, source=params_path)
        with torch.device("meta"):
            model = cls(args, value_head=False)
        model.load_weights(state_dict, source=ckpt_path, allow_missing_value_head=False, assign=True,
                           shape_hint="shapes do not match params.json")
        model.to(device=device, dtype=dtype)
        value_head_path = os.path.join(path, "value_head.pth")
        if value_head is not False and os.path.isfile(value_head_path):
            model.load_value_head(value_head_path)
        elif value_head:
            model.add_value_head()
        return model

    @classmethod
    def from_hf(cls, path: str, device="cpu", dtype=torch.bfloat16, value_head: Optional[bool] = False,
                max_seq_len: Optional[int] = None) -> "Transformer":
        """Load a Hugging Face LLaMA directory (config.json + safetensors, hf.py): one head, unless it
        is an export of this repo with heads 1..n-1 in hf.HEADS_FILE. Weights are memory-mapped and
        handed to a model built on the meta device (copies only where HF's layout differs: wq, wk
        and a tied output); they end up in `dtype` (None: as stored). max_seq_len: default
        max_position_embeddings. value_head as in from_pretrained (from hf.HEADS_FILE)."""
        params, state_dict, value_sd = hf.read_dir(path)
        if max_seq_len is not None:
            params["max_seq_len"] = max_seq_len
        args = ModelArgs.from_dict(params, source=os.path.join(path, "config.json"))
        with torch.device("meta"):
            model = cls(args, value_head=False)
        model.load_weights(state_dict, source=path, allow_missing_value_head=False, assign=True,
                           shape_hint=f"shapes do not match config.json (and {hf.HEADS_FILE})")
        model.to(device=device, dtype=dtype)
        if value_head is not False and value_sd:
            model.set_value_head(value_sd, source=os.path.join(path, hf.HEADS_FILE))
        elif value_head:
            model.add_value_head()
        return model

    def load_value_head(self, path: str):
        """Attach a value_head.pth (ValueHead state dict, keys without the 'value_head.' prefix);
        adds a value head if there is none; it stays fp32."""
        return self.set_value_head(ddp_utils.load_weights(path, mmap=False), source=path)

    def set_value_head(self, state_dict: dict, source: str):
        """Attach a ValueHead state dict (keys without the 'value_head.' prefix) read from `source`;
        adds a value head if there is none; it stays fp32."""
        if self.value_head is None:
            self.add_value_head()
        own = self.value_head.state_dict()
        missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
        bad = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
               if k in state_dict and state_dict[k].shape != own[k].shape]
        if missing or unexpected or bad:
            raise ValueError(f"{source}: not a value head of this model: missing {missing}, unexpected {unexpected}, "
                             f"shape mismatches {bad}")
        self.value_head.load_state_dict(state_dict)
        self.value_head.float()
        return self

    @classmethod
    def load(cls, path: str, device="cpu", dtype=torch.float32, value_head: Optional[bool] = None,
             n_future_tokens: Optional[int] = None) -> "Transformer":
        """Load any model this repo knows: a Meta-format directory, a Hugging Face LLaMA directory,
        a stage checkpoint file (`ckpt.pt`, `best.pt`, `final.pt`), or a stage's out_dir (best.pt,
        else final.pt, else ckpt.pt).
        value_head=None keeps the checkpoint's value head (if any); True adds a fresh one if missing;
        False drops it. The value head stays fp32 whatever `dtype` is. dtype=None keeps every
        weight as stored: on the CPU the weights then stay memory-mapped from the file (no copy;
        train_common.place_model converts them one at a time on their way to the GPU).
        n_future_tokens: None keeps the source's heads; n gives exactly n heads (set_n_future_tokens:
        added heads are copies of head 0, so head 0's logits equal the source's)."""
        if n_future_tokens is not None:  # the source's model, then its heads set
            model = cls.load(path, device=device, dtype=dtype, value_head=value_head)
            return model if model.n_future_tokens == n_future_tokens else model.set_n_future_tokens(n_future_tokens)
        path = resolve_checkpoint(path)
        if os.path.isdir(path):
            loader = cls.from_pretrained if os.path.isfile(os.path.join(path, "params.json")) else cls.from_hf
            return loader(path, device=device, dtype=dtype, value_head=value_head)
        ckpt = ddp_utils.load_checkpoint(path)  # weights only, memory-mapped
        return cls.from_checkpoint(ckpt, device=device, dtype=dtype, value_head=value_head, source=path)

    @classmethod
    def from_checkpoint(cls, ckpt: dict, device="cpu", dtype=torch.float32, value_head: Optional[bool] = None,
                        source: str = "checkpoint") -> "Transformer":
        """Build the model of a checkpoint dict ({'model', 'model_args', ...}). Built on the meta
        device and given the checkpoint's own tensors (no random init, no copy where device and
        dtype already match; dtype=None keeps each weight's stored dtype)."""
        state_dict = ckpt["model"]
        has_value_head = any(k.startswith("value_head.") for k in state_dict)
        want_value_head = has_value_head if value_head is None else value_head
        if not want_value_head:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("value_head.")}
        try:
            args = ModelArgs(**ckpt["model_args"])
        except TypeError as e:  # e.g. model_args written by another version of this file
            raise ValueError(f"{source}: model_args do not fit this model.py ({e})") from None
        with torch.device("meta"):
            model = cls(args, value_head=want_value_head and has_value_head)
        model.load_weights(state_dict, source=source, assign=True)
        model.to(device=device, dtype=dtype)
        if want_value_head and not has_value_head:
            model.add_value_head()
        if model.value_head is not None:
            model.value_head.float()
        return model


def sample_next(logits, temperature: float = 0.0, top_k: Optional[int] = None, generator=None):
    """logits (B, V) -> next token ids (B,): argmax at temperature 0, else top-k/temperature sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
