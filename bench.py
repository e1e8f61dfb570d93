"""
Speed and memory of one full training step (forward, backward, optimizer step) of a model and a
stage, for several variants side by side in ONE process, with ratios against a baseline variant.

    python bench.py                                    # micro model, default variants (seconds, any machine)
    python bench.py config/bench_cpu.py                # the small CPU table of dev/LOG.md
    python bench.py config/bench_1b.py --variants="['base','hf','n1']" --json_out=out/bench_1b.json
    python bench.py config/bench_cpu.py --threads=1 --variants="['base','base','hf']"   # x time of the 2nd base ~ 1
    bash dev/bench_h100.sh                             # the issue-7 set on one H100 (< 8 minutes)

A variant is the settings below plus modifiers joined by '+', applied left to right (e.g. 'naive',
'rho1+uncached'):
  base                          the settings as given
  naive | seq                   forward_backward(naive=True): all heads' graphs at once | sequential heads
  ce<N>                         ce_chunk_size=N (ce0: plain cross-entropy over full logits)
  compile | eager               torch.compile of each TransformerBlock (skipped on CPU unless compile_on_cpu)
  n<k>                          k future tokens with the same trunk depth (n_layers - n_future_tokens + k blocks)
  L<k>                          n_layers=k blocks in all (after n<k>: 'n1+L22' is a plain 22-layer LLaMA)
  hf                            Hugging Face LlamaForCausalLM, same dims and n_layers (same parameter
                                count as our model), its standard next-token loss, same optimizer
  baseline | verifiable | rho1  the stage's loss, as in train_baseline / train_verifiable / train_rho1.py
  cached | uncached             rho1: reference CE from a pinned host cache | a frozen reference forward
  all | heads                   trainable weights (heads: trunk + embeddings frozen, stored in the compute dtype)
  b<N>                          batch_size=N
  V<N> | pad<k>                 vocab_size=N | pad_vocab_multiple=k (e.g. 'V32001' vs 'V32001+pad64')
  sync                          step_sync=True: one host sync per step, as the train scripts' optimizer_step

The table goes to the screen, the JSON report (every number) to json_out only. Before the first
timed variant, the baseline variant runs once untimed (process_warmup): a process's first steps pay
one-time costs (lazy library and kernel set-up, the allocator growing, thread pools starting) that
would otherwise land on whichever variant comes first. The same variant listed twice gives the
check: its second x time should be ~1 (dev/LOG.md has a CPU measurement).

Measured per variant (the JSON has every number; the table rounds them):
  tokens/s  batch_size * seq_len / step time; step time = the median of `iters` timed steps after
            `warmup` steps, so one step slowed down by another process on a shared machine does not
            move it (step_ms_min/max in the JSON give the spread). Per-step times from CUDA events
            recorded between the steps (no host sync inside the loop, no .item() inside a step),
            the host clock on a CPU (its steps are synchronous), a sync after each step on MPS.
  CPU time  (step_cpu_ms in the JSON; CPU only) the median CPU time of this process per step, all
            its threads. With one thread, wall time well above it means other processes had the
            core: the wall-clock ratios are then noise (a note says so), CPU-time ratios much less so.
  MFU       flops_per_token() * tokens/s / dense peak FLOP/s of the device (PEAK_FLOPS); null on CPU.
  peak mem  CUDA: torch.cuda.max_memory_allocated over warm-up + timed steps, reset per variant after
            the model and optimizer are built. CPU (no allocator peak API): one extra step under
            torch.profiler(profile_memory=True); its allocation/free events, summed in time order,
            give the peak bytes above what was live before the step; we add the bytes live before
            the step (weights and optimizer state of this variant). Counts every tensor allocated
            through PyTorch's CPU allocator, not library scratch space (oneDNN/MKL) or Python objects.
"""

import contextlib
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import ddp_utils
from data.format import fail
from ddp_utils import peak_flops
from model import ModelArgs, Transformer
from model import flops_per_token as model_flops_per_token
from weighting import build_weights, compute_td_errors, n_selected, select_top_k, shift_to_heads, value_loss, value_mask

# -----------------------------------------------------------------------------
# settings (override with a config file and --key=value); defaults: a micro model, seconds on a CPU
# model
dim = 64  # model width
n_layers = 5  # total blocks: trunk (n_layers - n_future_tokens) + n_future_tokens heads
n_heads = 4  # attention heads
n_kv_heads: int | None = None  # None: = n_heads
vocab_size = 512  # vocabulary rows of the embedding and output
multiple_of = 32  # FFN hidden size rounded up to a multiple of this
ffn_dim_multiplier: float | None = None  # FFN hidden size multiplier (LLaMA-2's)
n_future_tokens = 4  # heads (n)
pad_vocab_multiple = 1  # embedding/output rows padded to a multiple of this (padded logits masked)
# workload
batch_size = 4  # sequences per step
seq_len = 64  # tokens per sequence (every row full length; completion = the last 50..87% of it)
stage = "baseline"  # 'baseline' | 'verifiable' | 'rho1'
trainable = "all"  # 'all' | 'heads' (trunk frozen; with verifiable also the value head trains)
ref_cached = True  # rho1: reference CE read from a host cache (True) or a reference forward every step
value_coef = 0.5  # verifiable: weight of the value MSE
k_percent = 0.6  # rho1: fraction of each extra head's targets selected
naive = False  # forward_backward(naive=...)
ce_chunk_size = 0  # 0: plain CE over (B, S, V) logits; N: chunked CE over N tokens at a time
compile = False  # torch.compile each TransformerBlock
compile_on_cpu = False  # also try the 'compile' variants on a CPU (slow to build)
# optimizer (as train_*.py: AdamW, fused on CUDA, grad clipping)
learning_rate = 1e-5  # AdamW learning rate (small: the step is timed, not trained)
weight_decay = 0.1  # AdamW weight decay
beta1 = 0.9  # AdamW betas
beta2 = 0.95  # AdamW betas
grad_clip = 1.0  # 0: no clipping
step_sync = False  # read the grad norm's isfiniteness on the host every step, as ddp_utils.optimizer_step does
# system
device = "auto"  # 'auto' | 'cuda' | 'cuda:N' | 'mps' | 'cpu'
dtype = ""  # '' = 'bfloat16' on CUDA (if supported), else 'float32'; bf16 runs under autocast
tf32 = True  # CUDA: TF32 matmuls for float32 (MFU then uses the TF32 peak)
threads = 0  # torch.set_num_threads (0: torch's default); 1 gives steadier numbers on a busy CPU
seed = 1337  # weights and batches
# benchmark
warmup = 2  # untimed steps per variant (compilation happens here)
iters = 5  # timed steps per variant
process_warmup = True  # one untimed run of the baseline variant before any timed one (the process's one-time costs)
variants = ["base", "naive", "ce32", "n1", "hf", "compile"]  # the variants to time, side by side (see the table above)
baseline_variant = ""  # ratios are against this variant ('' = the first one)
time_budget_s = 0.0  # 0: no limit; otherwise variants that would start after this many seconds are skipped
json_out = "out/bench.json"  # the JSON report, rewritten after every variant ('' = none); not printed
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
config = {k: v for k, v in globals().items()
          if not k.startswith("_") and isinstance(v, (bool, int, float, str, list, type(None)))}
# -----------------------------------------------------------------------------

def model_args(cfg):
    """The ModelArgs of a variant's settings (the hf peer takes its dimensions from them too)."""
    return ModelArgs(dim=cfg["dim"], n_layers=cfg["n_layers"], n_heads=cfg["n_heads"], n_kv_heads=cfg["n_kv_heads"],
                     vocab_size=cfg["vocab_size"], multiple_of=cfg["multiple_of"],
                     ffn_dim_multiplier=cfg["ffn_dim_multiplier"], n_future_tokens=cfg["n_future_tokens"],
                     max_seq_len=cfg["seq_len"], pad_vocab_multiple=cfg["pad_vocab_multiple"])


def flops_per_token(cfg):
    """Model FLOPs of one training step per input token, every head counted (PaLM appendix B style).

    A block's matmul weights P = 2*d*d (wq, wo) + 2*d*d_kv (wk, wv) + 3*d*ffn (w1, w2, w3); its forward
    costs 2*P (one multiply-add per weight) + 4*S*d (QK^T and AV over all S keys: causal masking is not
    discounted, as in PaLM / nanoGPT). The shared output costs 2*d*V per head. Backward = 2x forward
    (input grads + weight grads; attention: dQ, dK, dV, dP). A frozen trunk under trainable heads gets
    no backward at all: nothing below it needs a gradient, so autograd records nothing there. (The head
    blocks' wq/wk/wv then skip their input grads too, 2*(d*d + 2*d*d_kv) of a block's ~6*P: still
    counted, as the 6*P convention does.)
    Not counted (model FLOPs, not hardware FLOPs): chunked CE's logit recompute (+2*d*V per head),
    norms, RoPE, softmax, the optimizer, vocab padding (V is the real vocab). Embedding lookups are free.
      train:  (n_layers - n_trainable_blocks) * fwd_block + 3 * n_trainable_blocks * fwd_block
              + 3 * n_outputs * 2*d*V
      + verifiable: value head 6 * (d*d + d);   + rho1 uncached: the reference forward (all blocks, n outputs)
    """
    d, S, V, L = cfg["dim"], cfg["seq_len"], cfg["vocab_size"], cfg["n_layers"]
    args = model_args(cfg)
    n = cfg["n_future_tokens"]
    n_outputs = 1 if cfg["impl"] == "hf" else n
    n_train = L if cfg["trainable"] == "all" else n  # 'heads': the last n blocks (for hf: its last n layers)
    flops = model_flops_per_token(args, S, n_train, n_outputs)
    fwd_block, fwd_output = model_flops_per_token(args, S, 0, 0, forward_block_only=True), 2 * d * V
    if cfg["stage"] == "verifiable":
        flops += 6 * (d * d + d)
    if cfg["stage"] == "rho1" and not cfg["ref_cached"]:
        flops += L * fwd_block + n * fwd_output
    return flops


@contextlib.contextmanager
def without_usdt_lines():
    """torch.profiler's C++ backend (kineto) writes 'USDT:... profiler_start' / 'profiler_stop' lines
    to file descriptor 2 around every profile. Hold fd 2 in a temp file meanwhile and pass on
    everything but those lines (a kineto warning or error still shows)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not line.startswith("USDT:")))
            sys.stderr.flush()


def cpu_step_peak_bytes(step_fn):
    """Peak bytes allocated by PyTorch's CPU allocator during step_fn(), above the level before it:
    the profiler's memory events (+bytes per allocation, -bytes per free) summed in time order."""
    from torch.profiler import ProfilerActivity, profile
    with without_usdt_lines(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step_fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e[0])  # stable: simultaneous events keep their recorded order
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak


def live_bytes(tensors):
    """Bytes of the distinct storages behind these tensors."""
    storages = {}
    for t in tensors:
        if torch.is_tensor(t):
            s = t.untyped_storage()
            storages[(s.device, s.data_ptr())] = s.nbytes()
    return sum(storages.values())


def variant_config(name, base):
    """The settings of one variant: base plus the modifiers in name ('+'-separated)."""
    cfg = dict(base, name=name, impl="ours")
    for part in name.split("+"):
        if part == "base":
            pass
        elif part in ("naive", "seq"):
            cfg["naive"] = part == "naive"
        elif part in ("compile", "eager"):
            cfg["compile"] = part == "compile"
        elif part == "hf":
            cfg["impl"] = "hf"
        elif part in ("baseline", "verifiable", "rho1"):
            cfg["stage"] = part
        elif part in ("cached", "uncached"):
            cfg["ref_cached"] = part == "cached"
        elif part in ("all", "heads"):
            cfg["trainable"] = part
        elif part == "sync":
            cfg["step_sync"] = True
        elif re.fullmatch(r"ce\d+", part):
            cfg["ce_chunk_size"] = int(part[2:])
        elif re.fullmatch(r"n\d+", part):  # same trunk depth, k heads
            k = int(part[1:])
            cfg["n_layers"] = base["n_layers"] - base["n_future_tokens"] + k
            cfg["n_future_tokens"] = k
        elif re.fullmatch(r"L\d+", part):
            cfg["n_layers"] = int(part[1:])
        elif re.fullmatch(r"b\d+", part):
            cfg["batch_size"] = int(part[1:])
        elif re.fullmatch(r"V\d+", part):
            cfg["vocab_size"] = int(part[1:])
        elif re.fullmatch(r"pad\d+", part):
            cfg["pad_vocab_multiple"] = int(part[3:])
        else:
            raise ValueError(f"variant {name!r}: unknown modifier {part!r}")
    if cfg["stage"] not in ("baseline", "verifiable", "rho1") or cfg["trainable"] not in ("all", "heads"):
        raise ValueError(f"variant {name!r}: stage {cfg['stage']!r} / trainable {cfg['trainable']!r} unknown")
    try:
        flops_per_token(cfg)  # builds ModelArgs: checks dim / heads / n_future_tokens
    except ValueError as e:
        raise ValueError(f"variant {name!r}: {e}") from None
    return cfg


# -----------------------------------------------------------------------------
# setup

try:
    ctx = ddp_utils.setup(device)
    if ctx.ddp:
        raise ValueError("bench.py runs in one process (python bench.py), not under torchrun")
    dtype = dtype or ("bfloat16" if ctx.device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype {dtype!r}: use 'float32' or 'bfloat16'")
    if not variants:
        raise ValueError("variants is empty")
    configs = [variant_config(v, config) for v in variants]
    if warmup < 0 or iters < 1:
        raise ValueError(f"need warmup >= 0 and iters >= 1, got warmup={warmup}, iters={iters}")
    if baseline_variant and baseline_variant not in variants:
        raise ValueError(f"baseline_variant {baseline_variant!r} is not among variants {variants}")
except ValueError as e:
    fail(e)
config["dtype"] = dtype
if threads > 0:
    torch.set_num_threads(threads)
if ctx.device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
device_type = ctx.device_type
autocast = ddp_utils.autocast_context(ctx, dtype)
if device_type == "cuda":
    device_name = torch.cuda.get_device_name(ctx.device)
    mem_method = "torch.cuda.max_memory_allocated (all steps of the variant)"
elif device_type == "cpu":
    device_name = f"cpu {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    mem_method = "cpu: torch.profiler memory events of one step + weights/optimizer state live before it"
else:
    device_name, mem_method = device_type, "none (no peak-memory API on this device)"
device_peak_flops = peak_flops(device_name, dtype, tf32) if device_type == "cuda" else None


def sync():
    if device_type == "cuda":
        torch.cuda.synchronize()
    elif device_type == "mps":
        torch.mps.synchronize()


def git_commit():
    try:
        root = os.path.dirname(os.path.abspath(__file__))
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True)
        return (sha.stdout.strip() or "none") + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def make_batches(cfg, n_batches=4):
    """Random batches on the host (pinned on CUDA): tokens (B, S), loss_mask (B, S), reward (B,),
    and for cached rho1 the reference CE (B, S, n) (random values: the step's cost does not depend on them)."""
    B, S, n = cfg["batch_size"], cfg["seq_len"], cfg["n_future_tokens"]
    g = torch.Generator().manual_seed(cfg["seed"])
    batches = []
    for _ in range(n_batches):
        tokens = torch.randint(0, cfg["vocab_size"], (B, S), generator=g)
        prompt_len = torch.randint(S // 8, S // 2 + 1, (B, 1), generator=g)
        loss_mask = (torch.arange(S)[None, :] >= prompt_len).float()
        reward = torch.randint(0, 2, (B,), generator=g).float()
        ref_ce = torch.rand(B, S, n, generator=g) * 4 if cfg["stage"] == "rho1" and cfg["ref_cached"] else None
        batch = [tokens, loss_mask, reward, ref_ce]
        if device_type == "cuda":
            batch = [t.pin_memory() if t is not None else None for t in batch]
        batches.append(batch)
    return batches


# -----------------------------------------------------------------------------
# models and one training step

def build_ours(cfg, value_head, param_dtype=torch.float32):
    args = model_args(cfg)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(param_dtype)  # built on the device in its final dtype: no host copy of a 7B model
    try:
        with torch.device(ctx.device):
            model = Transformer(args, value_head=value_head)
    finally:
        torch.set_default_dtype(default_dtype)
    return model


def build_hf(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM  # ImportError: the variant is skipped
    args = model_args(cfg)
    hf_cfg = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
                         num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                         num_key_value_heads=args.n_kv_heads, rms_norm_eps=args.norm_eps,
                         max_position_embeddings=2 * cfg["seq_len"], rope_theta=args.rope_theta,
                         tie_word_embeddings=False, use_cache=False, attn_implementation="sdpa")
    with torch.device(ctx.device):
        model = LlamaForCausalLM(hf_cfg)
    return model


def set_trainable_hf(model, cfg):
    """'heads' for the peer: its last n_future_tokens layers + final norm + lm_head (as many trainable
    weights as our heads mode), embeddings and the layers below frozen."""
    first = cfg["n_layers"] - cfg["n_future_tokens"]
    params = []
    for name, p in model.named_parameters():
        m = re.match(r"model\.layers\.(\d+)\.", name)
        in_head = name.startswith(("model.norm.", "lm_head.")) or (m is not None and int(m.group(1)) >= first)
        train = cfg["trainable"] == "all" or in_head
        p.requires_grad_(bool(train))
        if train:
            params.append(p)
    return params


def make_step(cfg, model, ref_model, params, optimizer):
    """One full training step on a host batch; returns the loss as a device tensor (no host sync)."""
    n = cfg["n_future_tokens"]

    def step(batch):
        tokens, loss_mask, reward, ref_ce = [t.to(ctx.device, non_blocking=True) if t is not None else None
                                             for t in batch]
        if cfg["impl"] == "hf":
            labels = torch.where(loss_mask > 0, tokens, -100)  # the same completion targets as our head 0
            with autocast:
                loss = model(input_ids=tokens, labels=labels).loss
            loss.backward()
        else:
            targets = shift_to_heads(loss_mask, n)  # (B, S, n) 0/1
            n_targets = targets.sum(dim=(0, 1)).clamp(min=1)  # (n,) one micro-step = the whole step here
            kw = dict(naive=cfg["naive"], ce_chunk_size=cfg["ce_chunk_size"])
            with autocast:
                if cfg["stage"] == "baseline":  # the head losses as the train_*.py scripts write them
                    head_losses = model.forward_backward(
                        tokens, lambda k, ce_k: (targets[..., k] * ce_k).sum() / n_targets[k], **kw)
                elif cfg["stage"] == "verifiable":
                    h_trunk = model.trunk_forward(tokens)  # (B, S, dim)
                    values = model.value(h_trunk)  # (B, S) fp32
                    td = compute_td_errors(values.detach(), reward, loss_mask)
                    w_heads = shift_to_heads(build_weights(td, loss_mask), n)  # (B, S, n) detached
                    v_loss = value_loss(values, reward, value_mask(loss_mask))
                    head_losses = model.forward_backward(
                        tokens, lambda k, ce_k: (w_heads[..., k] * ce_k).sum() / n_targets[k], h_trunk=h_trunk,
                        extra_loss=cfg["value_coef"] * v_loss, **kw)
                else:  # rho1: head 0 every target, heads k >= 1 the top k_percent by excess loss
                    if ref_ce is None:
                        ref_ce = ref_model.head_cross_entropies(tokens, cfg["ce_chunk_size"]).float()
                    n_keep = torch.cat([n_targets[:1], n_selected(n_targets[1:], cfg["k_percent"]).float()])

                    def head_loss(k, ce_k):
                        w_k = targets[..., 0] if k == 0 else select_top_k(ce_k.detach() - ref_ce[..., k],
                                                                          targets[..., k], cfg["k_percent"])
                        return (w_k * ce_k).sum() / n_keep[k]

                    head_losses = model.forward_backward(tokens, head_loss, **kw)
            loss = head_losses.mean()
        if cfg["grad_clip"] > 0 or cfg["step_sync"]:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"] if cfg["grad_clip"] > 0 else float("inf"))
            if cfg["step_sync"] and not bool(torch.isfinite(norm)):  # the training loop's skip check: a host sync
                raise RuntimeError("non-finite gradient norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def run_variant(cfg):
    """Build, warm up, time and measure one variant; returns its result fields."""
    if cfg["compile"] and device_type != "cuda" and not cfg["compile_on_cpu"]:
        return {"status": "skipped", "note": f"torch.compile not run on {device_type} (--compile_on_cpu=True to try)"}
    if cfg["impl"] == "hf":
        if cfg["stage"] != "baseline":
            return {"status": "skipped", "note": "the hf peer runs only the standard loss (stage baseline)"}
        try:
            model = build_hf(cfg)
        except ImportError as e:
            return {"status": "skipped", "note": f"transformers not importable: {e}"}
        params = set_trainable_hf(model, cfg)
        blocks = list(model.model.layers)
    else:
        model = build_ours(cfg, value_head=cfg["stage"] == "verifiable")
        trainable_set = cfg["trainable"] + ("+value_head" if cfg["trainable"] == "heads" and model.value_head else "")
        params = model.set_trainable(trainable_set)
        blocks = [*model.layers, *model.extra_heads]
    ddp_utils.place_model(model, ctx, dtype)  # frozen weights stored in the compute dtype, as in training
    model.train()
    ref_model = None
    if cfg["impl"] == "ours" and cfg["stage"] == "rho1" and not cfg["ref_cached"]:
        ref_model = build_ours(cfg, value_head=False, param_dtype=ddp_utils.PTDTYPE[dtype]).eval().requires_grad_(False)
    if cfg["compile"]:
        for block in blocks:
            block.compile()
    # Transformer's AdamW set-up (it only reads .parameters(), so it serves the hf peer too)
    optimizer = Transformer.configure_optimizer(model, cfg["weight_decay"], cfg["learning_rate"],
                                                (cfg["beta1"], cfg["beta2"]), device_type)
    step = make_step(cfg, model, ref_model, params, optimizer)
    batches = make_batches(cfg)
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)

    for i in range(cfg["warmup"]):
        step(batches[i % len(batches)])
    sync()
    times, cpu_times = [], []  # seconds of each timed step: wall clock; on a CPU also this process's CPU time
    if device_type == "cuda":  # events recorded between the steps: per-step times, no host sync in the loop
        events = [torch.cuda.Event(enable_timing=True) for _ in range(cfg["iters"] + 1)]
        events[0].record()
        for i in range(cfg["iters"]):
            loss = step(batches[i % len(batches)])
            events[i + 1].record()
        sync()
        times = [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])]  # elapsed_time: ms
    else:  # a CPU step is synchronous (sync() is a no-op); MPS: a sync after each step
        for i in range(cfg["iters"]):
            t0, c0 = time.perf_counter(), time.process_time()
            loss = step(batches[i % len(batches)])
            sync()
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    dt = statistics.median(times)
    loss = loss.item()

    peak_mem = None
    if device_type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(ctx.device)
    elif device_type == "cpu":
        state = [*model.parameters(), *model.buffers()]
        state += [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        if ref_model is not None:
            state += list(ref_model.parameters())
        before = live_bytes(state)
        peak_mem = before + cpu_step_peak_bytes(lambda: step(batches[0]))
    tokens = cfg["batch_size"] * cfg["seq_len"]
    fpt = flops_per_token(cfg)
    mfu = fpt * tokens / dt / device_peak_flops if device_peak_flops else None
    return {"status": "ok", "note": "", "step_ms": dt * 1e3, "step_ms_min": min(times) * 1e3,
            "step_ms_max": max(times) * 1e3, "tokens_per_s": tokens / dt,
            "step_cpu_ms": statistics.median(cpu_times) * 1e3 if device_type == "cpu" else None,
            "flops_per_token": fpt, "mfu": mfu, "peak_mem_bytes": peak_mem,
            "params": sum(p.numel() for p in model.parameters()), "trainable_params": sum(p.numel() for p in params),
            "loss": loss}


# -----------------------------------------------------------------------------
# run the variants, print the table and the JSON

def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def first_line(e, n=200):
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:n]


def report_rows(results, base):
    """Fill in the ratios against the baseline variant."""
    b = next((r for r in results if r["name"] == base and r["status"] == "ok"), None)
    for r in results:
        ok = b is not None and r["status"] == "ok"
        r["ratios"] = {
            "step_time": r["step_ms"] / b["step_ms"] if ok else None,
            "tokens_per_s": r["tokens_per_s"] / b["tokens_per_s"] if ok else None,
            "peak_mem": (r["peak_mem_bytes"] / b["peak_mem_bytes"]
                         if ok and b["peak_mem_bytes"] and r["peak_mem_bytes"] is not None else None),
        }


def table(results):
    cols = ["variant", "status", "ms/step", "tokens/s", "x time", "MFU %", "peak MiB", "x mem", "params M",
            "train M", "loss", "note"]
    rows = []
    for r in results:
        x = r["ratios"]
        mem = r.get("peak_mem_bytes")
        rows.append([r["name"], r["status"], fmt(r.get("step_ms"), ".1f"), fmt(r.get("tokens_per_s"), ",.0f"),
                     fmt(x["step_time"], ".3f"), fmt(r["mfu"] * 100 if r.get("mfu") is not None else None, ".1f"),
                     fmt(mem / 2**20 if mem is not None else None, ",.1f"), fmt(x["peak_mem"], ".3f"),
                     fmt(r["params"] / 1e6 if r.get("params") else None, ".2f"),
                     fmt(r["trainable_params"] / 1e6 if r.get("trainable_params") else None, ".2f"),
                     fmt(r.get("loss"), ".3f"), r["note"]])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) if i in (0, 1, 11) else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(cols), line(["-" * w for w in widths]), *map(line, rows)])


def release(cfg):
    """Give a finished variant's memory back (its model, optimizer and any exception frames are gone now)."""
    gc.collect()
    if cfg["compile"]:
        torch._dynamo.reset()
    if device_type == "cuda":
        torch.cuda.empty_cache()


base_name = baseline_variant or variants[0]
report = {"device": device_name, "device_type": device_type, "torch": torch.__version__, "commit": git_commit(),
          "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "dtype": dtype,
          "peak_flops": device_peak_flops, "mem_method": mem_method, "baseline_variant": base_name, "config": config,
          "results": []}
print(f"bench: {device_name}, torch {torch.__version__}, commit {report['commit']}, dtype {dtype}, "
      f"B={batch_size} S={seq_len}, stage {stage}, trainable {trainable}, warmup {warmup}, iters {iters}")
print(f"peak memory: {mem_method}; peak FLOP/s for MFU: {fmt(device_peak_flops, '.3g')}")
t_start = time.time()
if process_warmup:
    cfg = configs[variants.index(base_name)]
    print(f"warm-up: {base_name}, untimed (the process's one-time costs) ...", flush=True)
    torch.manual_seed(cfg["seed"])
    try:
        run_variant(dict(cfg, iters=1))
        print(f"  warm-up done in {time.time() - t_start:.1f} s", flush=True)
    except Exception as e:  # noqa: BLE001  (its timed run reports the failure)
        print(f"  warm-up failed ({first_line(e)})", flush=True)
    release(cfg)
for cfg in configs:
    keys = ("impl", "stage", "trainable", "n_layers", "n_future_tokens", "batch_size", "naive", "ce_chunk_size",
            "compile", "ref_cached", "step_sync")
    r = {"name": cfg["name"], **{k: cfg[k] for k in keys}, "status": "error", "note": "", "step_ms": None,
         "step_ms_min": None, "step_ms_max": None, "step_cpu_ms": None, "tokens_per_s": None, "flops_per_token": None,
         "mfu": None, "peak_mem_bytes": None, "params": None, "trainable_params": None, "loss": None}
    if time_budget_s > 0 and time.time() - t_start > time_budget_s:
        r.update(status="skipped", note=f"time budget {time_budget_s:.0f} s spent")
    else:
        print(f"running {cfg['name']} ...", flush=True)
        torch.manual_seed(cfg["seed"])
        try:
            r.update(run_variant(cfg))
        except torch.OutOfMemoryError as e:  # = torch.cuda.OutOfMemoryError
            r.update(status="oom", note=first_line(e))
        except RuntimeError as e:  # the CPU allocator's OOM is a plain RuntimeError
            oom = "can't allocate memory" in str(e) or "out of memory" in str(e)
            r.update(status="oom" if oom else "error", note=first_line(e))
        except Exception as e:  # noqa: BLE001  (one variant failing must not stop the others)
            r.update(status="error", note=first_line(e))
    release(cfg)
    report["results"].append(r)
    report_rows(report["results"], base_name)
    if r["status"] == "ok":
        mem = r["peak_mem_bytes"] / 2**20 if r["peak_mem_bytes"] is not None else None
        mfu = r["mfu"] * 100 if r["mfu"] is not None else None
        cpu = f", CPU time {r['step_cpu_ms']:.1f} ms/step" if r["step_cpu_ms"] is not None else ""
        print(f"  {r['name']}: {r['step_ms']:.1f} ms/step (median of {iters}, {r['step_ms_min']:.1f}-"
              f"{r['step_ms_max']:.1f}{cpu}), {r['tokens_per_s']:,.0f} tokens/s, "
              f"MFU {fmt(mfu, '.1f')} %, peak {fmt(mem, ',.1f')} MiB", flush=True)
    else:
        print(f"  {r['name']}: {r['status']} ({r['note']})", flush=True)
    if json_out:
        os.makedirs(os.path.dirname(os.path.abspath(json_out)), exist_ok=True)
        with open(json_out, "w") as f:
            json.dump(report, f, indent=1)

print()
print(table(report["results"]))
print(f"ratios: x time = step time / {base_name}'s, x mem = peak memory / {base_name}'s")
waits = [r["step_ms"] / r["step_cpu_ms"] for r in report["results"] if r["status"] == "ok" and r["step_cpu_ms"]]
if waits and torch.get_num_threads() == 1 and max(waits) > 1.2:
    print(f"note: wall time per step was up to {max(waits):.1f}x this process's CPU time: other processes had the "
          f"core, so the wall-clock ratios are noise; compare step_cpu_ms in the JSON, or rerun on an idle machine")
if json_out:
    print(f"wrote {json_out}")
