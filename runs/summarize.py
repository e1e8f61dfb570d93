"""
The arith study's tables from its run directories, with paired statistics:
    python runs/summarize.py out/arith      -> out/arith/results.md, results.json, report.md (+ figures)

Reads <out>/seed*/<run>/eval.json (eval.py: the per-problem results too), wall_s.txt
(runs/arith.sh) and metrics.jsonl (the weight statistics of the stage-2 runs).

Every run answers the same test problems, so runs are compared problem by problem: for a run and
a control, the difference per problem (greedy: solved or not; sampled: the fraction of its samples
that are correct), averaged over the seeds both have, then over problems. Its 95% confidence
interval is a bootstrap over problems (10000 resamples, percentile); the minimum detectable
effect (MDE) is 2.8 standard errors (a two-sided 5% test with 80% power).

Decision rule, stated before the result: the positive control `oracle_prefix` must beat the
`verifiable_uniform` control in sampled pass@1 with a CI that excludes 0. If it does, the set-up
can detect a weighting effect and the table says where TD weighting lands between uniform and the
oracle; if it does not, the study cannot detect weighting effects at this size.
"""

import glob
import json
import math
import os
import sys

import numpy as np

if __name__ == "__main__":  # run as a script: make the repo root importable (runs.plot)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RUNS = [  # (directory, what it is)
    ("base", "base model (all solutions, from scratch)"),
    ("reference", "oracle model: base + correct-only fine-tuning (Rho-1's reference)"),
    ("baseline", "stage 0: uniform MTP CE"),
    ("critic", "stage 1: value head on the frozen base trunk (target R)"),
    ("critic_prefix", "stage 1: prefix critic (target 1 before the first wrong step, 0 after)"),
    ("verifiable_uniform", "stage 2 control: uniform weights + value loss"),
    ("verifiable_random", "stage 2 control: TD weights at random positions"),
    ("verifiable_shuffled", "stage 2 control: TD weights shuffled within rows"),
    ("verifiable_td", "stage 2: TD weights, beta 0.9"),
    ("verifiable_td_beta03", "stage 2: TD weights, beta 0.3"),
    ("verifiable_td_prefix", "stage 2: TD weights from the prefix critic"),
    ("oracle_prefix", "positive control: weight 1 before the first wrong step, 0 from it on"),
    ("oracle_td", "positive control: TD weights of a perfect prefix critic (beta 0.9)"),
    ("reward", "positive control: w = R (correct rows only, same rows and steps)"),
    ("rho1", "stage 3: Rho-1 vs the reference"),
]
COLUMNS = [  # (key in a run's numbers, header, digits)
    ("pass1_greedy", "pass@1 greedy", 3), ("pass1_sampled", "pass@1 T=1", 3), ("pass4", "pass@4", 3),
    ("pass8", "pass@8", 3), ("test_loss", "test loss", 3), ("value_auc", "value AUC", 3),
    ("token_auc", "token AUC", 3), ("w_on", "w before err", 2), ("w_off", "w from err", 2),
    ("w_std", "weight std", 3), ("w_clipped", "clipped", 3), ("iter", "iter", 0), ("wall_s", "wall s", 0),
]
CONTROLS = [("verifiable_uniform", "uniform"), ("baseline", "stage 0")]
METRICS = [("sampled", "pass@1 T=1"), ("greedy", "pass@1 greedy")]
PRIMARY = ("oracle_prefix", "verifiable_uniform", "sampled")  # the decision rule's comparison
Z_MDE = 1.96 + 0.84  # two-sided 5% test, 80% power
N_BOOT = 10000


def read_json(path):
    with open(path) as f:
        return json.load(f)


def numbers(run_dir):
    """The table's numbers of one run directory (None where not applicable) and its per-problem
    results {problem_id: {"greedy": 0/1, "sampled": fraction correct}} (or None)."""
    out = {k: None for k, _, _ in COLUMNS}
    per_problem = None
    path = os.path.join(run_dir, "eval.json")
    if os.path.isfile(path):
        e = read_json(path)
        out.update(pass1_greedy=e.get("pass@1_greedy"), pass1_sampled=e.get("pass@1_sampled"),
                   pass4=e.get("pass@k", {}).get("4"), pass8=e.get("pass@k", {}).get("8"),
                   test_loss=e.get("val_loss"), value_auc=e.get("value_auc"), token_auc=e.get("value_token_auc"),
                   iter=e.get("iter"))
        if e.get("per_problem"):
            per_problem = {pid: {"greedy": float(r["greedy"]),
                                 "sampled": r["sampled_correct"] / r["samples"] if r.get("samples") else None}
                           for pid, r in e["per_problem"].items()}
    if os.path.isfile(os.path.join(run_dir, "wall_s.txt")):
        with open(os.path.join(run_dir, "wall_s.txt")) as f:
            out["wall_s"] = float(f.read())
    if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            logged = [json.loads(line) for line in f if line.strip()]
        w = [m for m in logged if "weights/std" in m]
        if w:  # the run's mean of the logged statistics
            out["w_std"] = sum(m["weights/std"] for m in w) / len(w)
            for key, name in (("w_clipped", "frac_clipped"), ("w_on", "mean_on_track"), ("w_off", "mean_off_track")):
                vals = [m.get(f"weights/{name}") for m in w]
                if all(v is not None for v in vals):
                    out[key] = sum(vals) / len(vals)
    return out, per_problem


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return mean, std


def bootstrap_ci(values, n_boot=N_BOOT, seed=0):
    """95% percentile CI of the mean of `values` (one per problem), resampling the problems."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return None, None
    means = v[np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def per_problem_means(per_seed, metric, problems):
    """Each problem's value of `metric`, averaged over the seeds in per_seed ({seed: per_problem})."""
    return [float(np.mean([pp[p][metric] for pp in per_seed.values()])) for p in problems]


def paired(run_pp, control_pp, metric):
    """The paired difference run - control over the problems and seeds both have: mean, 95% CI,
    standard error, MDE and the counts. run_pp, control_pp: {seed: per_problem}."""
    seeds = sorted(set(run_pp) & set(control_pp))
    if not seeds:
        return None
    problems = sorted(set.intersection(*(set(run_pp[s]) & set(control_pp[s]) for s in seeds)))
    problems = [p for p in problems if all(run_pp[s][p][metric] is not None and control_pp[s][p][metric] is not None
                                           for s in seeds)]
    if not problems:
        return None
    d = np.array([np.mean([run_pp[s][p][metric] - control_pp[s][p][metric] for s in seeds]) for p in problems])
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    lo, hi = bootstrap_ci(d)
    return {"diff": float(d.mean()), "lo": lo, "hi": hi, "se": se, "mde": Z_MDE * se, "n_problems": len(problems),
            "n_seeds": len(seeds)}


def fmt_diff(p):
    if p is None:
        return ""
    return f"{p['diff']:+.3f} [{p['lo']:+.3f}, {p['hi']:+.3f}]"


def main(out_dir):
    seeds = sorted(glob.glob(os.path.join(out_dir, "seed*")))
    if not seeds:
        print(f"summarize.py: error: no seed* run directories under {out_dir}", file=sys.stderr)
        sys.exit(2)
    table, per_problem = {}, {}
    for run, what in RUNS:
        found = {os.path.basename(s): numbers(os.path.join(s, run)) for s in seeds if os.path.isdir(os.path.join(s, run))}
        if not found and os.path.isdir(os.path.join(out_dir, run)):  # trained once, shared by the seeds
            found = {"shared": numbers(os.path.join(out_dir, run))}
        if not found:
            continue
        nums = {s: n for s, (n, _) in found.items()}
        per_problem[run] = {s: pp for s, (_, pp) in found.items() if pp is not None}
        cells = {k: mean_std([v[k] for v in nums.values()]) for k, _, _ in COLUMNS}
        ci = {}
        for metric, _ in METRICS:
            pp = per_problem[run]
            problems = sorted(set.intersection(*(set(x) for x in pp.values()))) if pp else []
            ok = problems and all(x[p][metric] is not None for x in pp.values() for p in problems)
            ci[f"pass1_{metric}"] = list(bootstrap_ci(per_problem_means(pp, metric, problems))) if ok else None
        table[run] = {"what": what, "seeds": nums, "mean": {k: c[0] for k, c in cells.items()},
                      "std": {k: c[1] for k, c in cells.items()}, "ci": ci, "paired": {}}
    for run in table:
        for control, _ in CONTROLS:  # (a critic generates as its base: nothing to compare)
            if run != control and control in per_problem and not run.startswith(("base", "critic")):
                table[run]["paired"][control] = {m: paired(per_problem[run], per_problem[control], m) for m, _ in METRICS}

    run, control, metric = PRIMARY
    primary = table.get(run, {}).get("paired", {}).get(control, {}).get(metric)
    if primary is None:
        verdict = f"decision rule not evaluated: no {run} and {control} runs with per-problem results"
    elif primary["lo"] > 0:
        verdict = (f"DETECTABLE: {run} beats {control} in sampled pass@1 by {fmt_diff(primary)} (95% CI excludes 0): "
                   "this set-up can detect a weighting effect; read the TD rows against it")
    else:
        verdict = (f"NOT DETECTABLE: {run} vs {control} in sampled pass@1 is {fmt_diff(primary)} (CI includes 0): at "
                   f"this size (MDE {primary['mde']:.3f}) the study cannot detect weighting effects; more problems "
                   "(N_TEST), seeds (SEEDS) or steps would")

    def cell(run, key, digits):
        m, s = table[run]["mean"][key], table[run]["std"][key]
        if m is None:
            return ""
        return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if s is not None else "")

    names = [os.path.basename(s) for s in seeds]
    lines = [f"arith study, {len(seeds)} seed(s): {', '.join(names)}; every run's final.pt on the same test "
             "problems (mean ± std over seeds)", "",
             "| run | " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    lines += [f"| {run} | " + " | ".join(cell(run, k, d) for k, _, d in COLUMNS) + " |" for run in table]
    lines += ["", "Paired differences (run - control, per problem, pooled over seeds) with 95% bootstrap CIs:", "",
              "| run | " + " | ".join(f"{h} vs {c}" for c_run, c in CONTROLS for _, h in METRICS) + " |",
              "|---|" + "---|" * (len(CONTROLS) * len(METRICS))]
    mde = {}
    for run in table:
        row = []
        for c_run, _ in CONTROLS:
            for m, _ in METRICS:
                p = table[run]["paired"].get(c_run, {}).get(m)
                row.append(fmt_diff(p))
                if p is not None:
                    mde.setdefault((c_run, m), p)
        if any(row):
            lines.append(f"| {run} | " + " | ".join(row) + " |")
    lines += ["", "Minimum detectable effect (80% power, 5% two-sided), from each control's comparison with "
              + PRIMARY[0] + ": " + ", ".join(f"{h} vs {c} {table[PRIMARY[0]]['paired'][c_run][m]['mde']:.3f}"
                                               for c_run, c in CONTROLS for m, h in METRICS
                                               if table.get(PRIMARY[0], {}).get("paired", {}).get(c_run, {}).get(m))
              if PRIMARY[0] in table else "", "", f"Decision: {verdict}", "",
              *[f"- `{run}`: {table[run]['what']}" for run in table]]
    md = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"seeds": names, "runs": table, "decision": {"rule": list(PRIMARY), "result": primary,
                                                                "verdict": verdict}}, f, indent=1)
    print(md)
    write_report(out_dir, md, table, seeds)
    return table


def write_report(out_dir, md, table, seeds):
    """report.md: the tables, the figures (runs/plot.py, when matplotlib is installed) and the
    settings: each run's command line (cmd.txt, written by runs/arith.sh) and the data's size."""
    figures = []
    try:
        from runs.plot import plot_comparison, plot_curves
    except ImportError as e:  # matplotlib missing: the tables are the report
        print(f"summarize.py: no figures ({e})")
    else:
        figures.append(("pass@1 per run with 95% CIs", plot_comparison(read_json(os.path.join(out_dir, "results.json")),
                                                                       os.path.join(out_dir, "comparison.png"))))
        runs = [os.path.join(seeds[0], r) for r in table if os.path.isfile(os.path.join(seeds[0], r, "metrics.jsonl"))
                and not r.startswith("critic")]
        if runs:
            figures.append((f"training and validation loss, {os.path.basename(seeds[0])}",
                            plot_curves(runs, os.path.join(out_dir, "curves.png"))))
    lines = ["# The arith study", "", md, "## Figures", ""]
    lines += [f"![{title}]({os.path.basename(path)})" for title, path in figures] or ["(none: matplotlib is missing)"]
    lines += ["", "## Settings", "", "Command line of every run (runs/arith.sh; the configs are in config/):", ""]
    for seed in seeds:
        for run in table:
            cmd = os.path.join(seed, run, "cmd.txt")
            if not os.path.isfile(cmd):
                cmd = os.path.join(out_dir, run, "cmd.txt")
            if os.path.isfile(cmd):
                with open(cmd) as f:
                    lines.append(f"- `{os.path.basename(seed)}/{run}`: `{f.read().strip()}`")
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/arith")
