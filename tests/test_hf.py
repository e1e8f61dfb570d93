"""Hugging Face LLaMA directories in and out, checked against transformers itself: a random
LlamaForCausalLM saved with save_pretrained loads here with the same head-0 logits (MHA, GQA, MQA,
tied and untied embeddings, LLaMA-3.1 RoPE scaling, one file and shards); extra heads start as
copies of the last block; export.py --format=hf gives a directory that LlamaForCausalLM loads with
the same logits and this repo loads back with every head; a stage-0 run starts from an HF
directory whose only tokenizer is a tokenizer.json; unsupported architectures are refused with a
one-line error naming the field. Tiny random models, nothing downloaded."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from ddp_utils import save_checkpoint
from export import export_checkpoint
from model import ModelArgs, Transformer, llama3_scaled_freqs
from tests.helpers import FAST, SAMPLES, TEXTS, metrics, rss_bytes, run, run_script, train_losses
from tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

LOGIT_ATOL = 1e-5  # float32, max abs logit difference vs transformers (logits are O(1) here)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # head_dim 16, theta 5e5: kept, smoothed and scaled bands
SEQ = 100  # token positions in the logit checks: beyond original_max_position_embeddings


def hf_llama(vocab_size=101, n_kv_heads=2, tied=False, rope_scaling=None, n_layers=3, dim=64, seed=0):
    """A random LlamaForCausalLM. intermediate_size 100 is no multiple of anything and the norms are
    perturbed, so a wrong FFN width or a dropped norm would show; init std 0.1 gives O(1) logits."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=dim, intermediate_size=100 if dim == 64 else 4 * dim,
        num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=n_kv_heads, rms_norm_eps=1e-6,
        max_position_embeddings=128, tie_word_embeddings=tied, rope_theta=500000.0 if rope_scaling else 10000.0,
        rope_scaling=dict(rope_scaling) if rope_scaling else None,  # a copy: transformers adds keys to it
        initializer_range=0.1, bos_token_id=None, eos_token_id=None)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.float()  # (B, S, V)


CASES = {  # n_kv_heads, tied, rope_scaling, max_shard_size
    "mha": (4, False, None, None),
    "gqa_tied_sharded": (2, True, None, "30KB"),
    "gqa_llama3_rope": (2, False, LLAMA3_ROPE, None),
    "mqa_tied_llama3_rope_sharded": (1, True, LLAMA3_ROPE, "30KB"),
}


@pytest.mark.parametrize("case", CASES)
def test_save_pretrained_loads_with_the_same_head0_logits(case, tmp_path):
    n_kv_heads, tied, rope_scaling, shard = CASES[case]
    hf = hf_llama(n_kv_heads=n_kv_heads, tied=tied, rope_scaling=rope_scaling)
    hf.save_pretrained(tmp_path, max_shard_size=shard or "5GB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json") == bool(shard)
    tokens = torch.randint(0, 101, (2, SEQ), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(hf, tokens)
    for n in (1, 4):
        model = Transformer.load(str(tmp_path), n_future_tokens=n).eval()
        a = model.args
        assert (a.n_future_tokens, a.n_layers, a.n_kv_heads, a.ffn_hidden_dim, a.norm_eps) == (n, 3 + n - 1,
                                                                                           n_kv_heads, 100, 1e-6)
        assert a.rope_scaling == rope_scaling and a.max_seq_len == 128
        with torch.no_grad():
            ours = model(tokens, return_all_heads=True)  # (B, S, n, V)
        assert ours.shape == (2, SEQ, n, 101)
        assert (ours[:, :, 0] - ref).abs().max().item() <= LOGIT_ATOL
        for k in range(1, n):  # extra heads: copies of the last block with their own storage
            assert torch.equal(ours[:, :, k], ours[:, :, 0])
            assert model.extra_heads[k - 1].attention.wq.weight.data_ptr() != model.layers[-1].attention.wq.weight.data_ptr()
        if tied:  # untied on load: equal weights, separate storage
            assert torch.equal(model.output.weight, model.tok_embeddings.weight)
            assert model.output.weight.data_ptr() != model.tok_embeddings.weight.data_ptr()
    if rope_scaling:  # the check can see the scaling: the same weights with plain RoPE differ
        plain = Transformer(ModelArgs(**{**vars(a), "rope_scaling": None, "n_layers": 3, "n_future_tokens": 1}))
        plain.load_state_dict(Transformer.load(str(tmp_path)).state_dict())
        with torch.no_grad():
            assert (plain(tokens)[:, :, 0] - ref).abs().max().item() > 100 * LOGIT_ATOL


@pytest.mark.parametrize("head_dim,theta,rope", [(16, 500000.0, LLAMA3_ROPE),
                                                 (128, 500000.0, {**LLAMA3_ROPE, "original_max_position_embeddings": 8192}),
                                                 (64, 500000.0, {**LLAMA3_ROPE, "factor": 32.0, "original_max_position_embeddings": 8192})])
def test_llama3_rope_frequencies_equal_transformers(head_dim, theta, rope):
    """model.llama3_scaled_freqs against transformers' own llama3 inverse frequencies, bit for bit
    (Llama-3.1 8B's head_dim 128 and Llama-3.2 1B's factor 32 among them)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, rope_theta=theta,
                                   rope_scaling=dict(rope))
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    assert torch.equal(llama3_scaled_freqs(base, rope), expected)


def test_hf_weights_are_memory_mapped(tmp_path):
    """Transformer.load(hf_dir, dtype=None) (what the train scripts use) keeps the safetensors weights
    memory-mapped: the process grows by the copies of wq and wk only (~3% of this model)."""
    hf = hf_llama(vocab_size=32000, dim=512, n_layers=3).to(torch.bfloat16)  # ~42M params, 84 MB
    hf.save_pretrained(tmp_path)
    size = sum(p.numel() * 2 for p in hf.parameters())
    del hf
    Transformer.load(str(tmp_path), dtype=None)  # warm-up (the first meta-device build loads code)
    before = rss_bytes()
    model = Transformer.load(str(tmp_path), dtype=None)
    grown = rss_bytes() - before
    before = rss_bytes()
    converted = Transformer.load(str(tmp_path), dtype=torch.float32)
    grown_converted = rss_bytes() - before
    assert model.output.weight.dtype == torch.bfloat16 and converted.output.weight.dtype == torch.float32
    assert grown < 0.1 * size, (grown, size)
    # float32 copies are 2x the bf16 weights; the allocator may reuse up to 1x of memory freed before
    assert grown_converted > 0.9 * size, (grown_converted, size)  # the measurement sees copies


def write_config(path, **changes):
    """config.json of a valid tiny LLaMA with `changes` applied (None deletes a field)."""
    config = hf_llama().config.to_dict()
    for k, v in changes.items():
        config[k] = v
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return str(path)


UNSUPPORTED = {
    "attention_bias": True,
    "mlp_bias": True,
    "sliding_window": 4096,
    "num_local_experts": 8,
    "model_type": "mistral",
    "hidden_act": "gelu",
    "head_dim": 32,
    "architectures": ["LlamaForSequenceClassification"],
    "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0},
    "quantization_config": {"quant_method": "bitsandbytes"},
}


@pytest.mark.parametrize("field", UNSUPPORTED)
def test_unsupported_architectures_are_refused_naming_the_field(field, tmp_path):
    path = write_config(tmp_path / "bad", **{field: UNSUPPORTED[field]})
    with pytest.raises(ValueError) as e:
        Transformer.load(path)
    assert field in str(e.value) and "\n" not in str(e.value)


def test_pickle_weights_are_not_read(tmp_path):
    path = write_config(tmp_path / "bin")
    torch.save({}, os.path.join(path, "pytorch_model.bin"))
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin files are pickles"):
        Transformer.load(path)


# -----------------------------------------------------------------------------
# tokenizer.json

def train_tokenizer_json(directory, specials=("<|begin_of_text|>", "<|end_of_text|>"), config=True):
    """A byte-level BPE tokenizer.json (LLaMA-3's kind), made with the tokenizers library, plus the
    tokenizer_config.json that names its bos/eos when `config`. Returns the tokenizers object."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    if config:
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump({"bos_token": specials[0], "eos_token": {"content": specials[1], "special": True}}, f)
    return tok


def test_tokenizer_json_only_directory_encodes_like_tokenizers(tmp_path):
    ref = train_tokenizer_json(tmp_path / "hf")
    tok = Tokenizer(str(tmp_path / "hf"))  # a directory: its tokenizer.json, as there is no tokenizer.model
    assert tok.kind == "tokenizers" and tok.path.endswith("tokenizer.json")
    assert tok.n_words == ref.get_vocab_size() > 256
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)  # pad: eos, as for Meta's sentencepiece models
    for text in SAMPLES + TEXTS[:4]:
        if "<|" not in text:
            assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.decode(ids) == text
    ids = tok.encode("<|begin_of_text|> x <|end_of_text|>")  # special strings in text stay plain text
    assert not {tok.bos_id, tok.eos_id} & set(ids)
    # no tokenizer_config.json: bos/eos by their usual names; a pad_token when one is named
    train_tokenizer_json(tmp_path / "bare", specials=("<s>", "</s>", "<pad>"), config=False)
    assert (Tokenizer(str(tmp_path / "bare")).bos_id, Tokenizer(str(tmp_path / "bare")).eos_id) == (0, 1)
    with open(tmp_path / "bare" / "special_tokens_map.json", "w") as f:
        json.dump({"pad_token": "<pad>"}, f)
    assert Tokenizer(str(tmp_path / "bare")).pad_id == 2
    train_tokenizer_json(tmp_path / "nameless", specials=("<x>",), config=False)
    with pytest.raises(ValueError, match="no bos/eos token"):
        Tokenizer(str(tmp_path / "nameless"))


# -----------------------------------------------------------------------------
# export.py --format=hf

def test_export_hf_loads_in_transformers_and_back_with_every_head(tmp_path, monkeypatch, capsys):
    """An MTP model with trained-looking (perturbed) extra heads, a value head and a padded vocab,
    from a tied LLaMA-3.1-style source: export --format=hf -> LlamaForCausalLM logits = head 0's;
    Transformer.load of the export = the model, every head and the value head, bit for bit."""
    hf_llama(tied=True, rope_scaling=LLAMA3_ROPE).save_pretrained(tmp_path / "src")
    model = Transformer.load(str(tmp_path / "src"), n_future_tokens=3, value_head=True).pad_vocab(64).eval()
    torch.manual_seed(2)
    with torch.no_grad():
        for p in [*model.extra_heads.parameters(), *model.value_head.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    ckpt = {"model": model.state_dict(), "model_args": vars(model.args), "stage": "verifiable", "iter": 3,
            "data": {"tokenizer": None}}
    save_checkpoint(str(tmp_path / "run" / "final.pt"), ckpt)
    train_tokenizer_json(tmp_path / "tok")  # 400 ids >= the model's 101: refused
    with pytest.raises(ValueError, match="vocab_size is only 101"):
        export_checkpoint(str(tmp_path / "run"), str(tmp_path / "x"), tokenizer_path=str(tmp_path / "tok/tokenizer.json"),
                          format="hf")

    out = str(tmp_path / "export")
    assert run_script(["export.py", f"--init_from={tmp_path / 'run'}", f"--out_dir={out}", "--format=hf", "--dtype=float32"],
                      monkeypatch) == 0
    assert "wmtp_heads.safetensors" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "wmtp_heads.safetensors"]
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["tie_word_embeddings"] is False and config["rope_scaling"] == LLAMA3_ROPE
    tokens = torch.randint(0, 101, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(tokens, return_all_heads=True)
    exported_hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert exported_hf.lm_head.weight.shape == (101, 64)  # vocab padding dropped
    assert (hf_logits(exported_hf, tokens) - ours[:, :, 0]).abs().max().item() <= LOGIT_ATOL
    back = Transformer.load(out).eval()  # unpadded: the same logits up to the padded matmul's rounding
    assert back.n_future_tokens == 3 and back.value_head is not None
    assert all(torch.equal(v, model.state_dict()[k][:v.shape[0]]) for k, v in back.state_dict().items())
    with torch.no_grad():
        assert (back(tokens, return_all_heads=True) - ours).abs().max().item() <= 1e-6
        assert torch.equal(back.value(back.trunk_forward(tokens)), model.value(model.trunk_forward(tokens)))
    # and from the HF export to Meta's format: the same weights again
    meta = Transformer.load(export_checkpoint(out, str(tmp_path / "meta"), dtype="float32", format="meta"))
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in meta.state_dict().items())


# -----------------------------------------------------------------------------
# the scripts on an HF directory (real processes)

@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """An HF directory (GQA, tied, LLaMA-3.1 RoPE, sharded) whose only tokenizer is a tokenizer.json,
    arith data tokenized with it, and a short stage-0 run (3 heads, padded vocab) started from it."""
    root = tmp_path_factory.mktemp("hf_run")
    hf_dir, data_dir, out = str(root / "hf"), str(root / "data"), str(root / "baseline")
    tok = train_tokenizer_json(hf_dir)
    hf_llama(vocab_size=tok.get_vocab_size(), tied=True, rope_scaling=LLAMA3_ROPE).save_pretrained(
        hf_dir, max_shard_size="100KB")
    run(["data/arith/prepare.py", f"--out_dir={data_dir}", f"--tokenizer={hf_dir}/tokenizer.json",
         "--n_train_problems=40", "--n_val_problems=8", "--n_test_problems=4", "--seed=3"])
    run(["train_baseline.py", f"--data_dir={data_dir}", f"--out_dir={out}", f"--init_from={hf_dir}",
         "--n_future_tokens=3", "--max_iters=8", "--eval_interval=8", "--learning_rate=3e-3", "--warmup_iters=1",
         "--pad_vocab_multiple=64", *FAST])
    return hf_dir, data_dir, out


@pytest.mark.slow
def test_stage0_starts_from_the_hf_model(hf_run, tmp_path):
    """eval_only from the HF directory reproduces head 0's validation loss computed with transformers
    on the same rows; the run trains 3 heads and its loss falls."""
    hf_dir, data_dir, out = hf_run
    evalonly = str(tmp_path / "evalonly")
    run(["train_baseline.py", f"--data_dir={data_dir}", f"--out_dir={evalonly}", f"--init_from={hf_dir}",
         "--n_future_tokens=3", "--eval_only=True", *FAST])
    head_loss = [m for m in metrics(evalonly) if "val/head_loss" in m][0]["val/head_loss"]
    assert len(head_loss) == 3

    from data.loader import TokenDataset
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    ce_sum, count = 0.0, 0
    for i, item in enumerate(TokenDataset(data_dir, "val", max_length=96, overflow="truncate")):
        tokens = torch.as_tensor(item["tokens"], dtype=torch.long)[None]  # (1, L)
        first = item["prompt_len"] - 1  # the position whose target is the first completion token
        ce = F.cross_entropy(hf_logits(hf, tokens)[0, first:-1], tokens[0, first + 1:], reduction="sum")
        ce_sum, count = ce_sum + ce.item(), count + tokens.shape[1] - 1 - first
    assert head_loss[0] == pytest.approx(ce_sum / count, rel=1e-5)

    losses = train_losses(out)
    assert len(losses) == 8 and losses[-1] < losses[0]
    model = Transformer.load(out)
    assert model.n_future_tokens == 3 and model.args.pad_vocab_multiple == 64
    assert model.args.rope_scaling == LLAMA3_ROPE


@pytest.mark.slow
def test_stage0_run_exports_back_to_transformers(hf_run, tmp_path):
    hf_dir, _, out = hf_run
    exported = export_checkpoint(out, str(tmp_path / "export"), dtype="float32", format="hf")
    assert {"tokenizer.json", "tokenizer_config.json", "wmtp_heads.safetensors"} <= set(os.listdir(exported))
    model = Transformer.load(out).eval()
    tokens = torch.randint(0, model.args.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = model(tokens, return_all_heads=True)
    hf = transformers.LlamaForCausalLM.from_pretrained(exported).eval()
    assert (hf_logits(hf, tokens) - ours[:, :, 0]).abs().max().item() <= LOGIT_ATOL
    assert Tokenizer(exported).encode("1 + 2") == Tokenizer(hf_dir).encode("1 + 2")


@pytest.mark.slow
def test_sample_and_unsupported_dir_from_the_command_line(hf_run, tmp_path):
    hf_dir, data_dir, _ = hf_run
    p = run(["sample.py", f"--init_from={hf_dir}", "--start=Compute: 1 + 2", "--temperature=0", "--num_samples=1",
             "--max_new_tokens=4", "--device=cpu"])
    assert "tokenizer.json" in p.stdout
    bad = write_config(tmp_path / "bad", attention_bias=True)
    p = run(["train_baseline.py", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}", f"--init_from={bad}",
             *FAST], expect=2)
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("train_baseline.py: error:") and "attention_bias" in p.stderr
