"""
One comparison table of the arith study from its run directories:
    python runs/summarize.py out/arith            -> out/arith/results.md, out/arith/results.json

Reads <out>/seed*/<run>/eval.json (eval.py), wall_s.txt (runs/arith.sh) and, for the verifiable
runs, the weight statistics logged in metrics.jsonl. With several seeds each cell is the mean
and the standard deviation (n-1) over seeds.
"""

import glob
import json
import math
import os
import sys

RUNS = [  # (directory, what it is)
    ("base", "base model (all solutions, from scratch; trained once, shared by the seeds)"),
    ("reference", "oracle: base + correct-only fine-tuning"),
    ("baseline", "stage 0: uniform MTP CE"),
    ("critic", "stage 1: value head on the base trunk"),
    ("verifiable_td", "stage 2: TD weights"),
    ("verifiable_uniform", "stage 2 control: uniform weights + value loss"),
    ("verifiable_random", "stage 2 control: TD weights at random positions"),
    ("verifiable_shuffled", "stage 2 control: TD weights shuffled within rows"),
    ("rho1", "stage 3: Rho-1 vs the oracle"),
]
COLUMNS = [  # (key in a run's numbers, header, digits)
    ("pass1_greedy", "pass@1 greedy", 3), ("pass1_sampled", "pass@1 T=1", 3), ("pass4", "pass@4", 3),
    ("pass8", "pass@8", 3), ("test_loss", "test loss", 3), ("value_auc", "value AUC", 3),
    ("w_std", "weight std", 3), ("w_clipped", "clipped", 3), ("wall_s", "wall s", 0),
]


def numbers(run_dir):
    """The table's numbers of one run directory (None where not applicable)."""
    out = {k: None for k, _, _ in COLUMNS}
    path = os.path.join(run_dir, "eval.json")
    if os.path.isfile(path):
        with open(path) as f:
            e = json.load(f)
        out.update(pass1_greedy=e.get("pass@1_greedy"), pass1_sampled=e.get("pass@1_sampled"),
                   pass4=e.get("pass@k", {}).get("4"), pass8=e.get("pass@k", {}).get("8"),
                   test_loss=e.get("val_loss"), value_auc=e.get("value_auc"))
    if os.path.isfile(os.path.join(run_dir, "wall_s.txt")):
        with open(os.path.join(run_dir, "wall_s.txt")) as f:
            out["wall_s"] = float(f.read())
    if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            logged = [json.loads(line) for line in f if line.strip()]
        w = [m for m in logged if "weights/std" in m]
        if w:  # the run's mean of the logged per-batch statistics
            out["w_std"] = sum(m["weights/std"] for m in w) / len(w)
            if all("weights/frac_clipped" in m for m in w):
                out["w_clipped"] = sum(m["weights/frac_clipped"] for m in w) / len(w)
    return out


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return mean, std


def main(out_dir):
    seeds = sorted(glob.glob(os.path.join(out_dir, "seed*")))
    if not seeds:
        sys.exit(f"summarize.py: error: no seed* run directories under {out_dir}")
    table = {}
    for run, what in RUNS:
        per_seed = {os.path.basename(s): numbers(os.path.join(s, run)) for s in seeds if os.path.isdir(os.path.join(s, run))}
        if not per_seed and os.path.isdir(os.path.join(out_dir, run)):  # trained once, shared by the seeds
            per_seed = {"shared": numbers(os.path.join(out_dir, run))}
        if not per_seed:
            continue
        cells = {k: mean_std([v[k] for v in per_seed.values()]) for k, _, _ in COLUMNS}
        table[run] = {"what": what, "seeds": per_seed, "mean": {k: c[0] for k, c in cells.items()},
                      "std": {k: c[1] for k, c in cells.items()}}

    def cell(run, key, digits):
        m, s = table[run]["mean"][key], table[run]["std"][key]
        if m is None:
            return ""
        return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if s is not None else "")

    lines = [f"arith study, {len(seeds)} seed(s): {', '.join(os.path.basename(s) for s in seeds)} "
             "(mean ± std over seeds; test split)", "",
             "| run | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for run in table:
        lines.append(f"| {run} | " + " | ".join(cell(run, k, d) for k, _, d in COLUMNS) + " |")
    lines += ["", *[f"- `{run}`: {table[run]['what']}" for run in table]]
    md = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"seeds": [os.path.basename(s) for s in seeds], "runs": table}, f, indent=1)
    print(md)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/arith")
