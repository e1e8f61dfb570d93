"""
Issue 7's headline numbers, read from the JSON files dev/bench_h100.sh writes, as one markdown table
(measure, value, target) for dev/LOG.md and the README. A variant that did not run shows its status.

    python dev/bench_summary.py out/bench      # the folder bench_h100.sh wrote ($OUT on the device)
"""

import json
import os
import sys


def load(folder: str, group: str) -> dict:
    """{variant name: result} of one bench.py JSON report ({} if the file is missing)."""
    path = os.path.join(folder, f"{group}.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return {r["name"]: r for r in json.load(f)["results"]}


def value(results: dict, name: str, key: str):
    """results[name][key] for a variant that ran ('-' if it has no such number, e.g. MFU on a CPU),
    else its status ('oom', 'error', 'skipped'; 'missing' if it is not in the report)."""
    r = results.get(name)
    if r is None:
        return "missing"
    if r["status"] != "ok":
        return r["status"]
    return "-" if r.get(key) is None else r[key]


def ratio(results: dict, name: str, baseline: str, key: str):
    a, b = value(results, name, key), value(results, baseline, key)
    if isinstance(a, str) or isinstance(b, str):
        return a if isinstance(a, str) else b
    return a / b


def show(x, spec: str, unit: str = "", scale: float = 1.0) -> str:
    """A number formatted with its unit; a status string ('oom', 'missing', ...) as it is."""
    return x if isinstance(x, str) else format(x * scale, spec) + unit


def summary(folder: str) -> list:
    """[(measure, value, target)] rows of the three groups of dev/bench_h100.sh."""
    g1, g2, g3 = (load(folder, g) for g in ("bench_1b_impl", "bench_1b_stages", "bench_7b_heads"))
    rows = [
        ("1.1B n=4, stage 0, all trainable: MFU", show(value(g1, "base", "mfu"), ".1f", " %", 100), ">= 50 %"),
        ("1.1B n=4: tokens/s", show(value(g1, "base", "tokens_per_s"), ",.0f"), ""),
        ("tokens/s vs LlamaForCausalLM, same size and batch", show(ratio(g1, "base", "hf", "tokens_per_s"), ".2f", "x"),
         ">= 1.3x"),
        ("tokens/s vs our plain 22-block LLaMA (n1+L22)", show(ratio(g1, "base", "n1+L22", "tokens_per_s"), ".2f", "x"),
         ""),
        ("peak memory n=4 / n=1, same trunk", show(ratio(g1, "base", "n1", "peak_mem_bytes"), ".3f", "x"), "<= 1.10x"),
        ("peak memory naive / sequential head backward", show(ratio(g1, "naive", "base", "peak_mem_bytes"), ".3f", "x"),
         ""),
        ("chunked CE (2048): tokens/s, peak memory vs plain",
         show(ratio(g1, "ce2048", "base", "tokens_per_s"), ".3f", "x") + ", "
         + show(ratio(g1, "ce2048", "base", "peak_mem_bytes"), ".3f", "x"), ""),
        ("vocab 32001 padded to 32064: tokens/s vs unpadded",
         show(ratio(g1, "V32001+pad64", "V32001", "tokens_per_s"), ".3f", "x"), ""),
        ("torch.compile of the blocks: tokens/s vs eager", show(ratio(g1, "compile", "base", "tokens_per_s"), ".3f", "x"),
         ""),
    ]
    for name in ("sync", "verifiable", "rho1+cached", "rho1+uncached"):
        rows.append((f"stage overhead: {name} step time / stage 0",
                     show(ratio(g2, name, "baseline", "step_ms"), ".3f", "x"), ""))
    for name in ("base", "ce0", "naive", "verifiable", "rho1+cached", "rho1+uncached", "all", "compile"):
        rows.append((f"7B heads, frozen bf16 trunk, seq 2048: {name} peak memory",
                     show(value(g3, name, "peak_mem_bytes"), ".1f", " GiB", 1 / 2**30),
                     "fits 80 GB" if name == "base" else ""))
    return rows


def markdown(rows: list) -> str:
    return "\n".join(["| measure | value | target |", "|---|---|---|", *(f"| {m} | {v} | {t} |" for m, v, t in rows)])


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        print("usage: python dev/bench_summary.py FOLDER   (the folder dev/bench_h100.sh wrote)", file=sys.stderr)
        sys.exit(2)
    print(markdown(summary(sys.argv[1])))
