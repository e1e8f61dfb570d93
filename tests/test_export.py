"""export.py: a stage checkpoint -> Meta-format directory. Checked by loading it back with
from_pretrained (bit-identical in float32), by an independent loader (Hugging Face's LLaMA built
from params.json and consolidated.pth alone), and by the files' exact contents."""

import base64
import dataclasses
import json
import os

import pytest
import torch

from ddp_utils import save_checkpoint
from tests.helpers import run_script
from export import export_checkpoint
from model import ModelArgs, Transformer
from tokenizer import Tokenizer

torch.set_num_threads(2)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 512  # the tiktoken file below: 256 byte tokens + LLaMA-3's 256 special tokens
HF_LOGIT_ATOL = 1e-5  # float32 export vs Hugging Face on the same weights, max abs logit difference
BF16_LOGIT_ATOL = 1e-2  # bf16 export vs the fp32 model, max abs logit diff (measured 3e-3; |logits| <= 0.8)
META_PARAMS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
               "norm_eps", "rope_theta", "n_future_tokens"}


def micro_args():
    return ModelArgs(dim=64, n_layers=5, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=32,
                     ffn_dim_multiplier=1.3, norm_eps=1e-6, rope_theta=5000.0, n_future_tokens=4, max_seq_len=64)


def write_tokenizer(path):
    """A real (tiny) tiktoken BPE file: one token per byte."""
    with open(path, "w") as f:
        f.writelines(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256))
    assert Tokenizer(path).n_words == VOCAB
    return str(path)


def random_model(seed=0, value_head=True):
    torch.manual_seed(seed)
    model = Transformer(micro_args(), value_head=value_head)
    with torch.no_grad():  # perturb norms and value-head biases too, so a dropped or swapped one would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def write_run(run_dir, model, tok_path, stage="verifiable"):
    """A checkpoint dict as the train scripts write it (INTERFACES.md), with an AdamW-shaped optimizer
    state (built by hand: a real optimizer's first use costs seconds of imports)."""
    params = list(model.parameters())
    optimizer = {"state": {i: {"step": torch.tensor(7.0), "exp_avg": torch.randn_like(p),
                               "exp_avg_sq": torch.rand_like(p)} for i, p in enumerate(params)},
                 "param_groups": [{"lr": 1e-3, "weight_decay": 0.1, "params": list(range(len(params)))}]}
    sd = model.state_dict()
    # awkward but legal tensors: a non-contiguous one, and a slice of a bigger storage
    sd["output.weight"] = sd["output.weight"].t().contiguous().t()
    emb = sd["tok_embeddings.weight"]
    sd["tok_embeddings.weight"] = torch.cat([emb, emb])[: emb.shape[0]]
    ckpt = {"model": sd, "model_args": dataclasses.asdict(model.args), "stage": stage,
            "optimizer": optimizer, "iter": 7, "epoch": 0, "sampler_pos": 3, "rng": [],
            "best_val_loss": 1.5, "config": {"learning_rate": 1e-3},
            "data": {"dir": "data/x", "vocab_size": VOCAB, "tokenizer": tok_path}}
    return save_checkpoint(os.path.join(run_dir, "best.pt"), ckpt)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run dir whose best.pt holds `model`; its ckpt.pt holds other weights (must not be picked).
    Shared by the tests of this file, which only read it."""
    tmp_path = tmp_path_factory.mktemp("run")
    tok_path = write_tokenizer(tmp_path / "tok.model")
    model = random_model(0)
    run_dir = tmp_path / "run"
    write_run(str(run_dir), model, tok_path)
    save_checkpoint(str(run_dir / "ckpt.pt"), {"model": random_model(1).state_dict(),
                                                "model_args": dataclasses.asdict(micro_args())})
    return model, str(run_dir), tok_path


TOKENS = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0))


def test_float32_export_round_trip(run, tmp_path):
    model, run_dir, tok_path = run
    out = export_checkpoint(run_dir, str(tmp_path / "export"), dtype="float32")
    assert sorted(os.listdir(out)) == ["consolidated.pth", "params.json", "tokenizer.model", "value_head.pth"]
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temp folder left behind
    loaded = Transformer.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS, return_all_heads=True), model(TOKENS, return_all_heads=True))

    sd = torch.load(os.path.join(out, "consolidated.pth"), weights_only=True)  # plain tensors, nothing else
    assert list(sd) == list(Transformer(micro_args()).state_dict())  # Meta's keys, in Meta's order
    for k, v in sd.items():
        assert v.dtype == torch.float32 and v.is_contiguous(), k
        assert v.untyped_storage().nbytes() == v.numel() * v.element_size(), k  # no shared or oversized storage
    # optimizer state and value head not in it: the file is the weights' size plus small overhead
    n_bytes = sum(v.numel() * 4 for v in sd.values())
    assert os.path.getsize(os.path.join(out, "consolidated.pth")) < n_bytes + 100_000

    with open(os.path.join(out, "params.json")) as f:
        params = json.load(f)
    assert set(params) == META_PARAMS
    a = micro_args()
    assert params == {k: getattr(a, k) for k in META_PARAMS}
    with open(tok_path, "rb") as f1, open(os.path.join(out, "tokenizer.model"), "rb") as f2:
        assert f1.read() == f2.read()


def test_padded_vocab_is_dropped_on_export(tmp_path):
    """A checkpoint trained with pad_vocab_multiple (embedding/output rows 512 -> 600) exports
    Meta's shapes; the export computes the same logits; the checkpoint itself loads back padded."""
    tok_path = write_tokenizer(tmp_path / "tok.model")
    model = random_model(0).pad_vocab(100)
    with torch.no_grad():
        model.output.weight[VOCAB:] = 3.0  # masked rows: must not reach the export
    write_run(str(tmp_path / "run"), model, tok_path)
    out = export_checkpoint(str(tmp_path / "run"), str(tmp_path / "export"), dtype="float32")
    sd = torch.load(os.path.join(out, "consolidated.pth"), weights_only=True)
    assert sd["output.weight"].shape == sd["tok_embeddings.weight"].shape == (VOCAB, 64)
    with open(os.path.join(out, "params.json")) as f:
        assert set(json.load(f)) == META_PARAMS
    exported = Transformer.from_pretrained(out, dtype=torch.float32)
    again = Transformer.load(str(tmp_path / "run"))
    assert exported.output.weight.shape == (VOCAB, 64) and again.output.weight.shape == (600, 64)
    assert again.args.pad_vocab_multiple == 100
    with torch.no_grad():
        reference = model(TOKENS, return_all_heads=True)
        assert (exported(TOKENS, return_all_heads=True) - reference).abs().max().item() <= 1e-6
        assert torch.equal(again(TOKENS, return_all_heads=True), reference)


def hf_llama_from_meta_dir(meta_dir):
    """Independent loader: Hugging Face's LLaMA (trunk + head 0) from params.json and consolidated.pth
    alone, with LLaMA-2's FFN size rule and Meta -> HF's q/k row permutation written out here."""
    transformers = pytest.importorskip("transformers")
    with open(os.path.join(meta_dir, "params.json")) as f:
        p = json.load(f)
    sd = torch.load(os.path.join(meta_dir, "consolidated.pth"), weights_only=True)
    hidden = int(2 * 4 * p["dim"] / 3)
    if p["ffn_dim_multiplier"] is not None:
        hidden = int(p["ffn_dim_multiplier"] * hidden)
    hidden = p["multiple_of"] * ((hidden + p["multiple_of"] - 1) // p["multiple_of"])
    n_blocks = p["n_layers"] - p["n_future_tokens"] + 1  # trunk + head 0 are layers.0 .. layers.{n_blocks-1}
    cfg = transformers.LlamaConfig(
        vocab_size=p["vocab_size"], hidden_size=p["dim"], intermediate_size=hidden, num_hidden_layers=n_blocks,
        num_attention_heads=p["n_heads"], num_key_value_heads=p["n_kv_heads"], rms_norm_eps=p["norm_eps"],
        rope_theta=p["rope_theta"], max_position_embeddings=128, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False)
    cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(cfg).eval()

    def permute(w, n_heads):  # Meta's adjacent-pair RoPE rows -> HF's rotate_half rows
        out_dim, in_dim = w.shape
        return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)

    hf_sd = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
             "lm_head.weight": sd["output.weight"]}
    names = {"attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj",
             "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj",
             "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(n_blocks):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        hf_sd[h + "self_attn.q_proj.weight"] = permute(sd[m + "attention.wq.weight"], p["n_heads"])
        hf_sd[h + "self_attn.k_proj.weight"] = permute(sd[m + "attention.wk.weight"], p["n_kv_heads"])
        for ours, theirs in names.items():
            hf_sd[h + theirs + ".weight"] = sd[m + ours + ".weight"]
    missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
    assert not [k for k in missing if "rotary" not in k] and not unexpected, (missing, unexpected)
    return hf


def test_export_loads_into_hf_llama(run, tmp_path):
    model, run_dir, _ = run
    out = export_checkpoint(run_dir, str(tmp_path / "export"), dtype="float32")
    with torch.no_grad():
        ref = hf_llama_from_meta_dir(out)(TOKENS).logits
        ours = model(TOKENS)[:, :, 0]
    assert (ours - ref).abs().max().item() <= HF_LOGIT_ATOL


def test_value_head_round_trip(run, tmp_path):
    model, run_dir, _ = run
    out = export_checkpoint(run_dir, str(tmp_path / "export"))  # bf16 trunk; the value head stays fp32
    vh = torch.load(os.path.join(out, "value_head.pth"), weights_only=True)
    assert sorted(vh) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight", "norm.weight"]
    assert all(v.dtype == torch.float32 for v in vh.values())
    for k, v in vh.items():
        assert torch.equal(v, model.value_head.state_dict()[k]), k

    fp32 = export_checkpoint(out, str(tmp_path / "fp32"), dtype="float32", tokenizer_path="")  # re-export a Meta dir
    for value_head in (None, True):  # value_head.pth is picked up from the directory
        loaded = Transformer.from_pretrained(fp32, dtype=torch.float32, value_head=value_head)
        assert loaded.value_head.fc1.weight.dtype == torch.float32
        with torch.no_grad():  # same trunk (bf16-rounded in both) -> same values
            h = loaded.trunk_forward(TOKENS)
            assert torch.equal(loaded.value(h), model.value_head(h))

    bad = dict(vh)
    del bad["fc2.bias"]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing \['fc2.bias'\]"):
        loaded.load_value_head(str(tmp_path / "bad.pth"))
    assert Transformer.from_pretrained(fp32, dtype=torch.float32, value_head=False).value_head is None
    assert Transformer.load(fp32).value_head is not None  # load keeps the exported critic


def test_no_value_head_no_file(tmp_path):
    tok_path = write_tokenizer(tmp_path / "tok.model")
    write_run(str(tmp_path / "run"), random_model(0, value_head=False), tok_path, stage="baseline")
    out = export_checkpoint(str(tmp_path / "run" / "best.pt"), str(tmp_path / "export"))
    assert sorted(os.listdir(out)) == ["consolidated.pth", "params.json", "tokenizer.model"]


def test_bf16_export(run, tmp_path):
    model, run_dir, _ = run
    out = export_checkpoint(run_dir, str(tmp_path / "export"))  # default dtype: bfloat16
    sd = torch.load(os.path.join(out, "consolidated.pth"), weights_only=True)
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    loaded = Transformer.from_pretrained(out, dtype=torch.float32)
    rounded = Transformer(micro_args())  # the fp32 model with every weight rounded to bf16 once
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()
                             if not k.startswith("value_head.")})
    with torch.no_grad():
        got = loaded(TOKENS, return_all_heads=True)
        assert torch.equal(got, rounded.eval()(TOKENS, return_all_heads=True))  # only the rounding, nothing else
        full = model(TOKENS, return_all_heads=True)
    assert (got - full).abs().max().item() <= BF16_LOGIT_ATOL


def test_refuses_existing_dir_and_bad_inputs(run, tmp_path):
    model, run_dir, tok_path = run
    out = str(tmp_path / "export")
    os.makedirs(out)
    export_checkpoint(run_dir, out)  # an empty existing dir is fine
    mtime = os.path.getmtime(os.path.join(out, "consolidated.pth"))
    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        export_checkpoint(run_dir, out, dtype="float32")
    assert os.path.getmtime(os.path.join(out, "consolidated.pth")) == mtime
    export_checkpoint(run_dir, out, dtype="float32", overwrite=True)
    assert torch.load(os.path.join(out, "consolidated.pth"), weights_only=True)["norm.weight"].dtype == torch.float32
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no temp or old folders left

    with pytest.raises(ValueError, match="holds the checkpoint"):
        export_checkpoint(run_dir, run_dir, overwrite=True)  # would delete the run
    with pytest.raises(ValueError, match="dtype 'float8'"):
        export_checkpoint(run_dir, str(tmp_path / "x"), dtype="float8")
    with pytest.raises(FileNotFoundError, match="neither a Meta directory"):
        export_checkpoint(str(tmp_path), str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match="tokenizer .*missing.model not found"):
        export_checkpoint(run_dir, str(tmp_path / "x"), tokenizer_path=str(tmp_path / "missing.model"))
    other_tok = tmp_path / "small.model"
    with open(other_tok, "w") as f:
        f.writelines(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(100))
    with pytest.raises(ValueError, match="has 356 words but the model's vocab_size is 512"):
        export_checkpoint(run_dir, str(tmp_path / "x"), tokenizer_path=str(other_tok))

    ckpt = torch.load(os.path.join(run_dir, "best.pt"), weights_only=False)
    ckpt["model"]["layers.0.attention.wq.bias"] = torch.zeros(64)
    del ckpt["model"]["extra_heads.2.ffn_norm.weight"]
    save_checkpoint(str(tmp_path / "bad" / "final.pt"), ckpt)
    with pytest.raises(ValueError, match=r"missing \['extra_heads.2.ffn_norm.weight'\], "
                                         r"unexpected \['layers.0.attention.wq.bias'\]"):
        export_checkpoint(str(tmp_path / "bad"), str(tmp_path / "x"))
    ckpt = torch.load(os.path.join(run_dir, "best.pt"), weights_only=False)
    ckpt["model"]["norm.weight"][3] = 1e5
    save_checkpoint(str(tmp_path / "big" / "final.pt"), ckpt)
    with pytest.raises(ValueError, match="norm.weight: values overflow float16"):
        export_checkpoint(str(tmp_path / "big"), str(tmp_path / "x"), dtype="float16")
    assert not os.path.exists(tmp_path / "x")  # no failed export left anything behind
    export_checkpoint(str(tmp_path / "big"), str(tmp_path / "x"), dtype="bfloat16")  # bf16 has fp32's range


def test_cli(run, tmp_path, monkeypatch, capsys):
    _, run_dir, _ = run
    out = str(tmp_path / "export")
    argv = ["export.py", f"--init_from={run_dir}", f"--out_dir={out}", "--dtype=float32"]
    assert run_script(argv, monkeypatch) == 0
    stdout = capsys.readouterr().out
    assert "consolidated.pth" in stdout and "48 tensors, float32" in stdout and "value_head.pth" in stdout
    assert torch.load(os.path.join(out, "consolidated.pth"), weights_only=True)["output.weight"].dtype == torch.float32
    assert run_script(argv, monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("export.py: error: out_dir") and "overwrite" in err
    assert run_script([*argv, "--dtype=bfloat16", "--overwrite=True"], monkeypatch) == 0
    assert torch.load(os.path.join(out, "consolidated.pth"), weights_only=True)["output.weight"].dtype == torch.bfloat16


def test_interrupted_export_leaves_nothing(run, tmp_path, monkeypatch):
    _, run_dir, _ = run

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("export.shutil.copyfile", disk_full)  # the last file written
    with pytest.raises(OSError, match="No space left"):
        export_checkpoint(run_dir, str(tmp_path / "export"))
    assert os.listdir(tmp_path) == []  # neither out_dir nor the temp folder


def test_cli_settings(monkeypatch, capsys):
    assert run_script(["export.py", "--help"], monkeypatch) == 0
    listed = [line.split("=")[0].strip() for line in capsys.readouterr().out.splitlines()[1:]]
    assert listed == ["--dtype", "--format", "--init_from", "--out_dir", "--overwrite", "--tokenizer"]
