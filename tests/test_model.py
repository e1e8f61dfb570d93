"""model.py against an independent implementation (Hugging Face LlamaForCausalLM) on the same
weights, the Meta-format round trip, the memory-efficient training step and KV-cache generation."""

import json
import os

import pytest
import torch

from model import ModelArgs, Transformer
from tests.helpers import rss_bytes, weighted_mtp_ce, weights_head_loss

torch.set_num_threads(2)

LOGIT_ATOL = 1e-5  # float32, max abs difference on logits vs Hugging Face
GRAD_ATOL = 1e-6  # float32, sequential vs naive backward


def micro_args(n_future_tokens=4, n_kv_heads=None, n_layers=5, vocab_size=97, dim=64, n_heads=4, **kw):
    return ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
                     multiple_of=32, n_future_tokens=n_future_tokens, max_seq_len=64, **kw)


def random_model(args, seed=0, value_head=False):
    torch.manual_seed(seed)
    model = Transformer(args, value_head=value_head)
    with torch.no_grad():  # perturb the norms too, so a wrong norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


# -----------------------------------------------------------------------------
# independent reference: Hugging Face's LLaMA

def hf_llama_for_head(model: Transformer, k: int):
    """A plain LLaMA made of the MTP trunk + head k, converted to Hugging Face's layout."""
    transformers = pytest.importorskip("transformers")
    a = model.args
    cfg = transformers.LlamaConfig(
        vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.ffn_hidden_dim,
        num_hidden_layers=a.n_layers - a.n_future_tokens + 1, num_attention_heads=a.n_heads,
        num_key_value_heads=a.n_kv_heads, rms_norm_eps=a.norm_eps, max_position_embeddings=2 * a.max_seq_len,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, rope_theta=a.rope_theta,
    )
    cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(cfg).eval()

    def permute(w, n_heads):  # Meta's adjacent-pair RoPE rows -> HF's rotate_half rows
        out_dim, in_dim = w.shape
        return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)

    blocks = list(model.layers[:-1]) + [model.heads()[k]]
    sd = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.output.weight}
    for i, b in enumerate(blocks):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = permute(b.attention.wq.weight, a.n_heads)
        sd[p + "self_attn.k_proj.weight"] = permute(b.attention.wk.weight, a.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = b.attention.wv.weight
        sd[p + "self_attn.o_proj.weight"] = b.attention.wo.weight
        sd[p + "mlp.gate_proj.weight"] = b.feed_forward.w1.weight
        sd[p + "mlp.down_proj.weight"] = b.feed_forward.w2.weight
        sd[p + "mlp.up_proj.weight"] = b.feed_forward.w3.weight
        sd[p + "input_layernorm.weight"] = b.attention_norm.weight
        sd[p + "post_attention_layernorm.weight"] = b.ffn_norm.weight
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not [m for m in missing if "rotary" not in m] and not unexpected, (missing, unexpected)
    return hf


@pytest.mark.parametrize("n_future_tokens,n_kv_heads", [(1, None), (4, None), (4, 2), (2, 1)])
def test_heads_match_hf_llama(n_future_tokens, n_kv_heads):
    model = random_model(micro_args(n_future_tokens, n_kv_heads))
    tokens = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        ours = model(tokens, return_all_heads=True)  # (B, S, n, V)
        assert ours.shape == (2, 23, n_future_tokens, 97) and ours.dtype == torch.float32
        assert torch.equal(model(tokens)[:, :, 0], ours[:, :, 0])  # return_all_heads=False = head 0
        for k in range(n_future_tokens):
            ref = hf_llama_for_head(model, k)(tokens).logits
            assert (ours[:, :, k] - ref).abs().max().item() <= LOGIT_ATOL


def test_ffn_hidden_rule():
    # LLaMA-2 7B: dim 4096, multiple_of 256 -> 11008; 70B: dim 8192, x1.3, multiple_of 4096 -> 28672
    assert ModelArgs(dim=4096, n_heads=32, multiple_of=256).ffn_hidden_dim == 11008
    assert ModelArgs(dim=8192, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3).ffn_hidden_dim == 28672


def test_meta_layout_keys():
    model = Transformer(micro_args(4, n_layers=5))
    keys = set(model.state_dict())
    # n_layers=5, n=4: layers = 1 trunk block + head 0; extra_heads = heads 1..3
    assert "layers.1.feed_forward.w3.weight" in keys and "layers.1.attention_norm.weight" in keys
    assert "layers.2.attention.wq.weight" not in keys
    assert {f"extra_heads.{j}.ffn_norm.weight" for j in range(3)} <= keys
    assert {"tok_embeddings.weight", "norm.weight", "output.weight"} <= keys
    assert not any(k.startswith("value_head") for k in keys)


def write_meta_dir(path, model, vocab_size_in_params=None, extra_params=None):
    os.makedirs(path, exist_ok=True)
    a = model.args
    params = {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
              "vocab_size": a.vocab_size if vocab_size_in_params is None else vocab_size_in_params,
              "multiple_of": a.multiple_of, "ffn_dim_multiplier": a.ffn_dim_multiplier, "norm_eps": a.norm_eps,
              "rope_theta": a.rope_theta, "n_future_tokens": a.n_future_tokens, **(extra_params or {})}
    with open(os.path.join(path, "params.json"), "w") as f:
        json.dump(params, f)
    torch.save(model.state_dict(), os.path.join(path, "consolidated.pth"))


@pytest.mark.parametrize("value_head", [False, True])
def test_from_pretrained_round_trip(tmp_path, value_head):
    model = random_model(micro_args(4, 2))
    write_meta_dir(tmp_path, model, vocab_size_in_params=-1, extra_params={"max_batch_size": 32})
    loaded = Transformer.from_pretrained(str(tmp_path), device="cpu", dtype=torch.float32, value_head=value_head)
    tokens = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert torch.equal(model(tokens, return_all_heads=True), loaded(tokens, return_all_heads=True))
    assert loaded.args.vocab_size == 97  # -1 in params.json -> from the embedding
    assert (loaded.value_head is not None) == value_head
    if value_head:
        assert loaded.value_head.fc1.weight.dtype == torch.float32
        assert loaded.value(loaded.trunk_forward(tokens)).shape == (2, 11)


def test_from_pretrained_dtypes(tmp_path):
    model = random_model(micro_args(2))
    write_meta_dir(tmp_path, model)
    for dtype in (torch.bfloat16, torch.float16):
        m = Transformer.from_pretrained(str(tmp_path), device="cpu", dtype=dtype, value_head=True)
        assert m.output.weight.dtype == dtype and m.value_head.fc2.weight.dtype == torch.float32
        out = m(torch.randint(0, 97, (1, 5)), return_all_heads=True)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_from_pretrained_key_mismatch_names_keys(tmp_path):
    model = random_model(micro_args(2))
    write_meta_dir(tmp_path, model)
    sd = model.state_dict()
    del sd["extra_heads.0.attention.wq.weight"]
    sd["bogus.weight"] = torch.zeros(1)
    torch.save(sd, os.path.join(tmp_path, "consolidated.pth"))
    with pytest.raises(ValueError, match=r"extra_heads\.0\.attention\.wq\.weight.*bogus\.weight"):
        Transformer.from_pretrained(str(tmp_path), device="cpu", dtype=torch.float32)


def test_load_weights_shape_mismatch_message():
    a = Transformer(micro_args(2, dim=64))
    b = Transformer(micro_args(2, dim=32, n_heads=2))
    with pytest.raises(ValueError, match="another model shape"):
        a.load_weights(b.state_dict(), source="x.pt")


# -----------------------------------------------------------------------------
# memory-efficient training step

def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ce_chunk_size", [0, 7])
def test_sequential_backward_equals_naive(weighted, ce_chunk_size):
    args = micro_args(4, 2)
    model = random_model(args, value_head=True).train()
    torch.manual_seed(1)
    tokens = torch.randint(0, 97, (3, 17))
    mask = torch.zeros(3, 17)
    mask[:, 6:] = 1
    w = torch.zeros(3, 17, 4)  # w[b, t, k] = mask[b, t+k+1]
    for k in range(4):
        w[:, : 17 - k - 1, k] = mask[:, k + 1:]
    if weighted:
        w = w * torch.rand_like(w) * 3
    results = {}
    for naive in (True, False):
        model.zero_grad(set_to_none=True)
        h = model.trunk_forward(tokens)
        extra = ((model.value(h) - 1.0) ** 2).mean() * 0.5
        out = model.forward_backward(tokens, weights_head_loss(w), h_trunk=h, extra_loss=extra, naive=naive,
                                     ce_chunk_size=ce_chunk_size)
        results[naive] = (out, _grads(model))
    (o_naive, g_naive), (o_seq, g_seq) = results[True], results[False]
    assert o_naive.shape == (4,) and torch.allclose(o_naive, o_seq, atol=1e-6)
    assert set(g_naive) == set(g_seq) == {n for n, p in model.named_parameters()}
    for name in g_naive:
        assert (g_naive[name] - g_seq[name]).abs().max().item() <= GRAD_ATOL, name


def test_chunked_ce_equals_plain_and_matches_manual_loss():
    model = random_model(micro_args(2)).train()
    tokens = torch.randint(0, 97, (2, 9))
    w = torch.ones(2, 9, 2)
    w[:, -1, 0] = 0
    w[:, -2:, 1] = 0
    outs, grads = [], []
    for chunk in (0, 4):
        model.zero_grad(set_to_none=True)
        outs.append(model.forward_backward(tokens, weights_head_loss(w), ce_chunk_size=chunk))
        grads.append(_grads(model))
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n
    # each head's loss = its mean CE over its targets: the whole-tensor oracle on Meta's forward logits
    with torch.no_grad():
        logits = model(tokens, return_all_heads=True)  # (2, 9, 2, V)
    ce = torch.zeros(2, 9, 2)  # ce[b, t, k] against tokens[b, t+k+1]
    for k in range(2):
        lp = torch.log_softmax(logits[:, : 9 - k - 1, k], -1)
        ce[:, : 9 - k - 1, k] = -lp.gather(-1, tokens[:, k + 1:, None])[..., 0]
    loss, heads = weighted_mtp_ce(ce, w)
    assert (outs[0] - heads).abs().max().item() < 1e-5 and abs(outs[0].mean().item() - loss.item()) < 1e-5


def test_head_loss_sees_each_heads_ce_and_its_value_is_returned():
    """The script's head_loss gets head k's live per-position CE (it backpropagates through it) and
    may select from its detached copy (Rho-1); forward_backward returns what head_loss returned."""
    model = random_model(micro_args(2)).train()
    tokens = torch.randint(0, 97, (2, 9))
    seen, returned = [], []

    def head_loss(k, ce_k):
        seen.append((k, tuple(ce_k.shape), ce_k.requires_grad))
        selected = (ce_k.detach() > ce_k.detach().median()).float()
        returned.append((selected * ce_k).sum() / 7.0)
        return returned[-1]

    out = model.forward_backward(tokens, head_loss)
    assert seen == [(0, (2, 9), True), (1, (2, 9), True)]
    assert out.shape == (2,) and not out.requires_grad
    assert torch.equal(out, torch.stack([r.detach() for r in returned]))
    assert model.output.weight.grad is not None and model.tok_embeddings.weight.grad is not None


def test_frozen_trunk_gets_no_grad():
    model = random_model(micro_args(2)).train()
    trunk_names = {n for n, _ in model.named_parameters() if n.startswith("tok_embeddings") or n.startswith("layers.0.")}
    for n, p in model.named_parameters():
        p.requires_grad_(n not in trunk_names)
    out = model.forward_backward(torch.randint(0, 97, (2, 9)), weights_head_loss(torch.ones(2, 9, 2)))
    for n, p in model.named_parameters():
        assert (p.grad is None) == (n in trunk_names), n
    assert torch.isfinite(out).all()


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    """train_common.maybe_compile (torch.compile of every block, inductor on the CPU here) under the
    sequential head backward: same losses and gradients as eager, at two sequence lengths."""
    import train_common
    eager = random_model(micro_args(2, 2, n_layers=4), seed=6).train()
    compiled = random_model(micro_args(2, 2, n_layers=4), seed=6).train()
    train_common.maybe_compile(compiled, True)
    torch.manual_seed(3)
    for S in (16, 12):
        tokens, w = torch.randint(0, 97, (2, S)), torch.rand(2, S, 2)
        w[:, -2:] = 0
        outs, grads = [], []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            outs.append(model.forward_backward(tokens, weights_head_loss(w), ce_chunk_size=8))
            grads.append(_grads(model))
        assert (outs[0] - outs[1]).abs().max().item() <= 1e-6
        assert grads[0].keys() == grads[1].keys()
        for name in grads[0]:
            assert (grads[0][name] - grads[1][name]).abs().max().item() <= 1e-6, (S, name)


class HostReads(torch.overrides.TorchFunctionMode):
    """Records every tensor operation that reads a value back to the host (a device sync on a GPU):
    .item(), .tolist(), bool/int/float(), nonzero, boolean-mask indexing, .cpu(), ..."""
    READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "masked_select",
             "unique", "cpu", "numpy", "repeat_interleave_tensor"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in self.READS:
            self.reads.append(name)
        if name in ("__getitem__", "__setitem__") and torch.is_tensor(args[1]) and args[1].dtype == torch.bool:
            self.reads.append(name + "[bool mask]")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("naive,ce_chunk_size", [(False, 0), (False, 8), (True, 0)])
def test_training_micro_steps_never_read_back_to_the_host(naive, ce_chunk_size):
    """The per-micro-step work of the stages (weights, head losses as the scripts write them,
    sequential backward) queues device work only; the one host read per optimizer step is
    optimizer_step's isfinite(grad norm)."""
    import ddp_utils
    from weighting import (build_weights, compute_td_errors, random_like_weights, select_top_k, shift_to_heads,
                           shuffle_within_rows, value_loss, value_mask)
    model = random_model(micro_args(3, 2, pad_vocab_multiple=64), value_head=True).train()
    torch.manual_seed(4)
    tokens, reward = torch.randint(0, 97, (3, 20)), torch.tensor([1.0, 0.0, 1.0])
    loss_mask = torch.zeros(3, 20)
    loss_mask[:, 6:17] = 1
    loss_mask[1, 17:] = 1
    ref_ce = torch.rand(3, 20, 3)
    n_targets = torch.tensor([30.0, 29.0, 28.0])  # the scripts' step normalisers (computed once per step)
    with HostReads() as host:
        targets = shift_to_heads(loss_mask, 3)  # stage 0
        model.forward_backward(tokens, lambda k, ce_k: (targets[..., k] * ce_k).sum() / n_targets[k],
                               naive=naive, ce_chunk_size=ce_chunk_size)
        vmask = value_mask(loss_mask)  # stage 1 and 2
        h_trunk = model.trunk_forward(tokens)
        values = model.value(h_trunk)
        td = compute_td_errors(values.detach(), reward, loss_mask, 1.0)
        w = build_weights(td, loss_mask, 0.9, 0.1, 5.0, whiten=True, normalize=True)
        w = shift_to_heads(shuffle_within_rows(random_like_weights(w, loss_mask, None), loss_mask, None), 3)
        model.forward_backward(tokens, lambda k, ce_k: (w[..., k] * ce_k).sum() / n_targets[k], h_trunk=h_trunk,
                               extra_loss=0.5 * value_loss(values, reward, vmask, count=n_targets[0]), naive=naive,
                               ce_chunk_size=ce_chunk_size)

        def rho1_head_loss(k, ce_k):  # stage 3
            w_k = targets[..., k] if k == 0 else select_top_k(ce_k.detach() - ref_ce[..., k], targets[..., k], 0.6)
            return (w_k * ce_k).sum() / n_targets[k]
        model.forward_backward(tokens, rho1_head_loss, naive=naive, ce_chunk_size=ce_chunk_size)
    assert host.reads == []
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)  # fused, as on CUDA
    with HostReads() as host:
        _, stepped = ddp_utils.optimizer_step(optimizer, params, 1.0)
    assert stepped and host.reads == ["__bool__"]


# -----------------------------------------------------------------------------
# generation

def greedy_by_full_forward(model, prompt, steps):
    seq = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq]))[0, -1, 0].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("n_future_tokens,n_kv_heads", [(1, None), (4, 2)])
def test_kv_cache_greedy_equals_full_forward(n_future_tokens, n_kv_heads):
    model = random_model(micro_args(n_future_tokens, n_kv_heads), seed=3)
    prompts = [[1, 5, 9, 2, 33], [1, 7], [1, 60, 61, 62, 63, 64, 65, 8]]
    batched = model.generate(prompts, max_new_tokens=12)
    for prompt, got in zip(prompts, batched):
        assert got == greedy_by_full_forward(model, prompt, 12)
        assert model.generate([prompt], max_new_tokens=12) == [got]


def test_generate_stops_at_eos_and_samples_reproducibly():
    model = random_model(micro_args(2), seed=4)
    prompt = [1, 5, 9]
    full = model.generate([prompt], max_new_tokens=10)[0]
    eos = full[3]
    cut = model.generate([prompt], max_new_tokens=10, eos_id=eos)[0]
    assert cut == full[: full.index(eos)]
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    s1 = model.generate([prompt] * 3, max_new_tokens=8, temperature=1.0, top_k=5, generator=g1)
    s2 = model.generate([prompt] * 3, max_new_tokens=8, temperature=1.0, top_k=5, generator=g2)
    assert s1 == s2 and len(s1) == 3 and all(len(r) == 8 for r in s1)
    # top_k=1 sampling is greedy
    assert model.generate([prompt], max_new_tokens=10, temperature=0.7, top_k=1)[0] == full


# -----------------------------------------------------------------------------
# vocab padding: rows up to a multiple of pad_vocab_multiple, padded ids masked

VOCAB_KEYS = ("tok_embeddings.weight", "output.weight")


def test_padded_vocab_same_init_and_relayout():
    plain = random_model(micro_args(3, 2), seed=5)
    padded = random_model(micro_args(3, 2, pad_vocab_multiple=64), seed=5)
    assert padded.args.padded_vocab_size == 128 and plain.args.padded_vocab_size == 97
    assert padded.output.weight.shape == padded.tok_embeddings.weight.shape == (128, 64)
    sd, sd_padded = plain.state_dict(), padded.state_dict()
    for k in sd:  # the same random draws as the unpadded model; the padded rows are zero
        if k in VOCAB_KEYS:
            assert torch.equal(sd_padded[k][:97], sd[k]) and sd_padded[k][97:].abs().sum().item() == 0.0, k
        else:
            assert torch.equal(sd_padded[k], sd[k]), k
    relaid = plain.pad_vocab(64)
    assert relaid.args.pad_vocab_multiple == 64 and relaid.output.out_features == 128
    assert all(torch.equal(relaid.state_dict()[k], sd_padded[k]) for k in sd_padded)
    back = relaid.pad_vocab(1)
    assert back.output.weight.shape == (97, 64) and all(torch.equal(back.state_dict()[k], sd[k]) for k in sd)
    with pytest.raises(ValueError, match="pad_vocab_multiple=0 must be an integer >= 1"):
        micro_args(pad_vocab_multiple=0)


@pytest.mark.parametrize("ce_chunk_size", [0, 5])
@pytest.mark.parametrize("naive", [False, True])
def test_padded_vocab_masks_the_padded_ids(ce_chunk_size, naive):
    """Same weights with and without padding: same logits, losses, gradients (0 on the padded
    rows), eval sums and generations, even with large weights in the padded output rows."""
    plain = random_model(micro_args(3, 2), seed=5).train()
    padded = random_model(micro_args(3, 2, pad_vocab_multiple=64), seed=5).train()
    with torch.no_grad():  # unmasked, these rows would dominate every softmax
        padded.output.weight[97:] = 5.0 * torch.randn(31, 64)
    torch.manual_seed(2)
    tokens = torch.randint(0, 97, (3, 17))
    w = torch.rand(3, 17, 3) * 2
    for k in range(3):
        w[:, 17 - k - 1:, k] = 0
    with torch.no_grad():
        lp, lq = plain(tokens, return_all_heads=True), padded(tokens, return_all_heads=True)
    assert lq.shape == lp.shape == (3, 17, 3, 97)
    assert (lp - lq).abs().max().item() <= LOGIT_ATOL
    outs, grads = [], []
    for model in (plain, padded):
        model.zero_grad(set_to_none=True)
        outs.append(model.forward_backward(tokens, weights_head_loss(w), naive=naive, ce_chunk_size=ce_chunk_size))
        grads.append(_grads(model))
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-6
    for name, g in grads[0].items():
        g_padded = grads[1][name]
        if name in VOCAB_KEYS:
            assert g_padded[97:].abs().max().item() == 0.0, name
            g_padded = g_padded[:97]
        assert (g - g_padded).abs().max().item() <= GRAD_ATOL, name
    mask = (w > 0).float()
    sums_p, sums_q = plain.head_eval_sums(tokens, mask), padded.head_eval_sums(tokens, mask)
    assert torch.allclose(sums_p[0], sums_q[0], atol=1e-4) and torch.equal(sums_p[1], sums_q[1])
    assert torch.equal(sums_p[2], sums_q[2])
    prompts = [[1, 5, 9], [1, 7, 3, 3, 2]]
    assert plain.generate(prompts, 8) == padded.generate(prompts, 8)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert (plain.generate(prompts, 8, temperature=1.0, generator=g1)
            == padded.generate(prompts, 8, temperature=1.0, generator=g2))


# -----------------------------------------------------------------------------
# loading without host copies

def test_checkpoint_loads_memory_mapped_without_a_host_copy(tmp_path):
    """Transformer.load(dtype=None) (what train_common.init_model uses) builds the model on the meta
    device and hands it the checkpoint's memory-mapped tensors: the process does not grow by the
    model's size. Converting to float32 does (the measurement can see a copy)."""
    import dataclasses

    from ddp_utils import save_checkpoint
    args = ModelArgs(dim=512, n_layers=3, n_heads=8, vocab_size=32000, multiple_of=256, n_future_tokens=2)
    model = Transformer(args).to(torch.bfloat16)  # ~44M params, 88 MB in bf16
    path = save_checkpoint(str(tmp_path / "ckpt.pt"), {"model": model.state_dict(),
                                                        "model_args": dataclasses.asdict(args)})
    size = sum(p.numel() * 2 for p in model.parameters())
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    del model
    Transformer.load(path, dtype=None)  # warm-up: the first build on the meta device loads ~60 MB of code
    before = rss_bytes()
    mapped = Transformer.load(path, dtype=None)
    grown_mapped = rss_bytes() - before
    assert mapped.output.weight.dtype == torch.bfloat16 and mapped.value_head is None
    before = rss_bytes()
    converted = Transformer.load(path, dtype=torch.float32)
    grown_converted = rss_bytes() - before
    assert grown_mapped < 0.1 * size, (grown_mapped, size)
    # float32 copies are 2x the bf16 file; the allocator may reuse up to 1x of memory freed above
    assert grown_converted > 0.9 * size, (grown_converted, size)
    for k, v in expected.items():
        assert torch.equal(mapped.state_dict()[k], v) and torch.equal(converted.state_dict()[k].to(v.dtype), v), k
