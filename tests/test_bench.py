"""bench.py as a real process: a micro config prints a well-formed table and writes a JSON report
(to its file only) whose numbers agree with each other, after an untimed warm-up run; the
profiler's USDT lines stay off the screen; and the sequential head backward needs less peak memory
than the naive one where the logits dominate (measured by bench.py's own CPU peak-memory method)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.slow  # bench.py processes (make test-fast skips them)


def bench(args, tmp_path):
    out = tmp_path / "bench.json"
    # glibc.malloc.hugetlb=1: large CPU tensors on transparent huge pages. Only for speed (first-touch page
    # faults of the 100 MB logits dominate a step on small VMs); the measured bytes do not change.
    env = dict(os.environ, OMP_NUM_THREADS="1", GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
    p = subprocess.run([sys.executable, "bench.py", "--device=cpu", "--threads=1", f"--json_out={out}", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, f"exit {p.returncode}\nSTDOUT\n{p.stdout[-3000:]}\nSTDERR\n{p.stderr[-3000:]}"
    lines = p.stdout.strip().splitlines()
    assert lines[-1] == f"wrote {out}"  # the JSON goes to its file, only its path to the screen
    assert not [line for line in lines if line.startswith("{")]
    assert "USDT" not in p.stdout + p.stderr  # the CPU profiler's (kineto's) start/stop lines
    with open(out) as f:
        report = json.load(f)
    return report, lines


def flops_per_token(d, L, n, V, S, ffn, n_outputs, extra_ref=False):
    """Training FLOPs per token counted per matmul, for MHA blocks (n_kv_heads = n_heads), all trainable."""
    fwd_block = 2 * (4 * d * d + 3 * d * ffn) + 4 * S * d  # wq wk wv wo, w1 w2 w3, QK^T + AV
    total = 3 * L * fwd_block + 3 * n_outputs * 2 * d * V
    if extra_ref:
        total += L * fwd_block + n * 2 * d * V
    return total


def test_micro_table_and_json_are_consistent(tmp_path):
    variants = ["base", "naive", "ce16", "n1", "hf", "compile", "verifiable", "rho1+uncached", "V500", "V500+pad64"]
    report, lines = bench([f"--variants={variants!r}", "--warmup=1", "--iters=2"], tmp_path)
    assert lines.index("warm-up: base, untimed (the process's one-time costs) ...") < lines.index("running base ...")
    results = {r["name"]: r for r in report["results"]}
    assert [r["name"] for r in report["results"]] == variants
    assert report["baseline_variant"] == "base" and report["device_type"] == "cpu" and report["peak_flops"] is None
    assert results["compile"]["status"] == "skipped" and "compile" in results["compile"]["note"]
    ok = [r for r in report["results"] if r["status"] == "ok"]
    assert {r["name"] for r in ok} >= {"base", "naive", "ce16", "n1", "verifiable", "rho1+uncached", "V500", "V500+pad64"}
    base = results["base"]
    tokens = 4 * 64  # default batch_size * seq_len
    for r in ok:
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["mfu"] is None
        assert r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"] and r["step_cpu_ms"] > 0  # medians of 2 steps
        assert abs(r["tokens_per_s"] * r["step_ms"] / 1e3 - tokens) < 1e-6 * tokens
        assert abs(r["ratios"]["step_time"] - r["step_ms"] / base["step_ms"]) < 1e-9
        assert abs(r["ratios"]["tokens_per_s"] * r["ratios"]["step_time"] - 1) < 1e-9
        assert abs(r["ratios"]["peak_mem"] - r["peak_mem_bytes"] / base["peak_mem_bytes"]) < 1e-9
        assert r["peak_mem_bytes"] > 4 * r["params"]  # at least the fp32 weights (plus AdamW state, activations)
        assert 5.0 < r["loss"] < 7.5  # ~ln(512) at init
    # same weights and data: the sequential and naive backward give the same loss
    assert abs(results["naive"]["loss"] - base["loss"]) < 1e-5
    assert results["n1"]["n_layers"] == 2 and results["n1"]["n_future_tokens"] == 1
    # vocab 500 padded to 512 rows: 2 x 12 more rows of dim 64, the same loss (padded ids masked)
    assert results["V500+pad64"]["params"] - results["V500"]["params"] == 2 * 12 * 64
    assert abs(results["V500+pad64"]["loss"] - results["V500"]["loss"]) < 1e-5
    assert results["V500+pad64"]["flops_per_token"] == results["V500"]["flops_per_token"]  # real vocab only
    # FLOPs per token, pinned against an independent count (dim 64, 5 blocks, 4 heads, vocab 512, S 64, ffn 192)
    assert base["flops_per_token"] == flops_per_token(64, 5, 4, 512, 64, 192, n_outputs=4) == 2629632
    assert results["n1"]["flops_per_token"] == flops_per_token(64, 2, 1, 512, 64, 192, n_outputs=1)
    assert results["rho1+uncached"]["flops_per_token"] == flops_per_token(64, 5, 4, 512, 64, 192, 4, extra_ref=True)
    if results["hf"]["status"] == "ok":  # transformers installed: same parameter count, one output
        assert results["hf"]["params"] == base["params"]
        assert results["hf"]["flops_per_token"] == flops_per_token(64, 5, 4, 512, 64, 192, n_outputs=1)
    # the table: a header, a ruler, one row per variant in order, with the JSON's numbers
    head = next(i for i, line in enumerate(lines) if line.startswith("variant "))
    assert lines[head].split()[:4] == ["variant", "status", "ms/step", "tokens/s"]
    assert set(lines[head + 1].replace(" ", "")) == {"-"}
    rows = [line.split() for line in lines[head + 2: head + 2 + len(variants)]]
    assert [row[0] for row in rows] == variants
    for row in rows:
        r = results[row[0]]
        assert row[1] == r["status"]
        if r["status"] == "ok":
            assert row[3] == f"{r['tokens_per_s']:,.0f}" and row[4] == f"{r['ratios']['step_time']:.3f}"
            assert row[6] == f"{r['peak_mem_bytes'] / 2**20:,.1f}" and row[7] == f"{r['ratios']['peak_mem']:.3f}"


def test_sequential_backward_peak_memory_below_naive(tmp_path):
    # vocab 32000, dim 32, 4 heads, B*S = 512 tokens: each head's fp32 logits are 66 MB, the weights
    # and AdamW state 25 MB. Naive keeps all 4 heads' log-softmax outputs for one backward; sequential one.
    report, lines = bench(["--vocab_size=32000", "--dim=32", "--n_heads=2", "--batch_size=2", "--seq_len=256",
                           "--variants=['seq','naive']", "--warmup=0", "--iters=1", "--process_warmup=False"], tmp_path)
    assert not [line for line in lines if line.startswith("warm-up")]
    seq, naive = report["results"]
    assert seq["status"] == naive["status"] == "ok"
    logits_bytes = 2 * 256 * 32000 * 4
    assert naive["peak_mem_bytes"] > 4 * logits_bytes  # all four heads' logits were alive at once
    assert seq["peak_mem_bytes"] / naive["peak_mem_bytes"] < 0.7
    assert abs(seq["loss"] - naive["loss"]) < 1e-5


def test_h100_summary_reads_the_reports(tmp_path):
    """dev/bench_summary.py (run at the end of dev/bench_h100.sh): ratios from hand-made reports,
    and a variant that did not run shows its status."""
    def report(name, results):
        with open(tmp_path / f"{name}.json", "w") as f:
            json.dump({"results": [dict(status="ok", **r) for r in results]}, f)
    GiB = 2**30
    report("bench_1b_impl", [dict(name="base", mfu=0.52, tokens_per_s=40000.0, peak_mem_bytes=40 * GiB),
                             dict(name="hf", tokens_per_s=25000.0, peak_mem_bytes=50 * GiB),
                             dict(name="n1", tokens_per_s=52000.0, peak_mem_bytes=37 * GiB),
                             dict(name="V32001", tokens_per_s=39000.0), dict(name="V32001+pad64", tokens_per_s=39390.0),
                             dict(name="naive", tokens_per_s=39000.0, peak_mem_bytes=None)])  # e.g. no peak API
    report("bench_7b_heads", [dict(name="base", peak_mem_bytes=30 * GiB)])
    with open(tmp_path / "bench_7b_heads.json") as f:  # 'all' ran out of memory
        heads = json.load(f)
    heads["results"].append({"name": "all", "status": "oom", "peak_mem_bytes": None})
    with open(tmp_path / "bench_7b_heads.json", "w") as f:
        json.dump(heads, f)
    p = subprocess.run([sys.executable, "dev/bench_summary.py", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1] for line in p.stdout.splitlines()[2:]}
    assert rows["1.1B n=4, stage 0, all trainable: MFU"] == "52.0 %"
    assert rows["tokens/s vs LlamaForCausalLM, same size and batch"] == "1.60x"
    assert rows["peak memory n=4 / n=1, same trunk"] == f"{40 / 37:.3f}x" == "1.081x"
    assert rows["vocab 32001 padded to 32064: tokens/s vs unpadded"] == "1.010x"
    assert rows["torch.compile of the blocks: tokens/s vs eager"] == "missing"
    assert rows["peak memory naive / sequential head backward"] == "-"
    assert rows["stage overhead: verifiable step time / stage 0"] == "missing"
    assert rows["7B heads, frozen bf16 trunk, seq 2048: base peak memory"] == "30.0 GiB"
    assert rows["7B heads, frozen bf16 trunk, seq 2048: all peak memory"] == "oom"
    bad = subprocess.run([sys.executable, "dev/bench_summary.py", str(tmp_path / "nope")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "usage" in bad.stderr
