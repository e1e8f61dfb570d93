"""
Figures of training runs and of the study, written as PNG files (matplotlib, no display needed).

    python runs/plot.py curves out/arith/seed1337/baseline out/arith/seed1337/verifiable_td --out=curves.png
    python runs/plot.py comparison out/arith/results.json --out=comparison.png

curves: the training loss (train/loss; train/value_mse for a critic) and the validation loss
(val/loss) against the iteration, read from each run directory's metrics.jsonl: two panels, one
colour per run, the legend by directory name. A critic's MSE and the stages' cross-entropy share
the axes, so a panel whose values span more than 10x gets a log scale.
comparison: the study's pass@1 per run, greedy and sampled side by side, with the 95% confidence
interval as error bars, from the results.json that runs/summarize.py writes:
    {"seeds": [...], "runs": {name: {"what": str, "mean": {"pass1_greedy": x|null, "pass1_sampled": x|null, ...},
                                     "ci": {"pass1_greedy": [lo, hi]|null, "pass1_sampled": [lo, hi]|null}}}}
Runs without either number are left out; a run without "ci" gets no error bars.
`plot_curves(run_dirs, out_path)` and `plot_comparison(results, out_path)` are importable and
return the path written.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: data.format

import matplotlib

matplotlib.use("Agg")  # files only: no display, also over ssh and in CI
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from data.format import fail  # noqa: E402

TRAIN_KEYS = ("train/loss", "train/value_mse")  # the first one a run logs is its training loss
VAL_KEY = "val/loss"  # a critic logs its value MSE under this name too


def read_curves(run_dir):
    """{"train": [(iter, loss)], "val": [(iter, loss)], "train_key": str | None} of one run directory.
    A resumed run appends to metrics.jsonl again from its checkpoint's iteration: the last value
    logged for an iteration wins."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (not a run directory, or it has logged nothing yet)")
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from None
    train_key = next((k for k in TRAIN_KEYS if any(k in r for r in rows)), None)
    train, val = {}, {}
    for r in rows:
        if train_key in r and "iter" in r:
            train[r["iter"]] = r[train_key]
        if VAL_KEY in r and "iter" in r:
            val[r["iter"]] = r[VAL_KEY]
    return {"train": sorted(train.items()), "val": sorted(val.items()), "train_key": train_key}


def short_names(paths):
    """The shortest path tails that tell the runs apart: 'baseline', or 'seed1/baseline' and
    'seed2/baseline' when the last names repeat."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
    for n in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-n:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [os.path.normpath(p) for p in paths]  # the same directory twice


def _log_if_wide(ax, values):
    """A log scale when the values span more than 10x, ticks as plain numbers (0.2, not 2x10^-1)."""
    values = [v for v in values if v is not None and v > 0]
    if values and max(values) > 10 * min(values):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))


def plot_curves(run_dirs, out_path):
    """Training and validation loss against the iteration of each run directory, one colour per run."""
    if not run_dirs:
        raise ValueError("no run directories given")
    curves = [read_curves(d) for d in run_dirs]  # every directory checked before anything is drawn
    empty = [d for d, c in zip(run_dirs, curves) if not c["train"] and not c["val"]]
    if empty:
        raise ValueError(f"{empty[0]}: metrics.jsonl has no {' / '.join(TRAIN_KEYS)} or {VAL_KEY} values")
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True, sharey=True)
    colours = plt.get_cmap("tab10" if len(run_dirs) <= 10 else "tab20")
    for i, (name, c) in enumerate(zip(short_names(run_dirs), curves)):
        colour = colours(i % colours.N)
        label = name + (" (value MSE)" if c["train_key"] == "train/value_mse" else "")
        if c["train"]:
            ax_train.plot(*zip(*c["train"]), color=colour, lw=1.2, label=label)
        if c["val"]:
            ax_val.plot(*zip(*c["val"]), color=colour, lw=1.2, marker="o", ms=3, label=label)
    values = [y for c in curves for key in ("train", "val") for _, y in c[key]]
    for ax, title in ((ax_train, "training loss"), (ax_val, "validation loss")):
        _log_if_wide(ax, values)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(True, alpha=0.3)
        ax.tick_params(which="both", labelleft=True)  # sharey hides them on the right panel
        if not ax.has_data():
            ax.text(0.5, 0.5, "nothing logged", transform=ax.transAxes, ha="center", color="grey")
    ax_train.set_ylabel("loss (cross-entropy; critics: value MSE)")
    handles, labels = ax_train.get_legend_handles_labels()
    if len(labels) < len(run_dirs):  # a run that logged validation only
        handles, labels = ax_val.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), frameon=False, fontsize=9)
    n_rows = -(-len(labels) // 4)
    fig.tight_layout(rect=(0, 0.06 * n_rows, 1, 1))
    return _save(fig, out_path)


def plot_comparison(results, out_path):
    """pass@1 per run, greedy and sampled side by side, with the 95% CI of results.json as error bars."""
    runs = [(name, r) for name, r in results.get("runs", {}).items()
            if any((r.get("mean") or {}).get(k) is not None for k in ("pass1_greedy", "pass1_sampled"))]
    if not runs:
        raise ValueError("no run in the results has a pass1_greedy or pass1_sampled number")
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(runs) + 2), 4.8))
    width, y_top = 0.38, 0.0
    for j, (key, label, colour) in enumerate((("pass1_greedy", "greedy", "tab:blue"),
                                              ("pass1_sampled", "sampled (T=1)", "tab:orange"))):
        bars, errs = [], []  # (x, y); (x, y, y - lo, hi - y) where the run has a CI
        for i, (_, r) in enumerate(runs):
            x, y = i + (j - 0.5) * width, r["mean"].get(key)
            if y is None:  # not 0: say so
                ax.text(x, 0.005, "n/a", ha="center", va="bottom", fontsize=8, color="grey")
                continue
            bars.append((x, y))
            ci = (r.get("ci") or {}).get(key)
            if ci:
                errs.append((x, y, y - ci[0], ci[1] - y))
            top = ci[1] if ci else y
            y_top = max(y_top, top)
            ax.annotate(f"{y:.3f}", (x, top), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                        fontsize=8)
        if bars:
            ax.bar(*zip(*bars), width, color=colour, label=label)
        if errs:  # only where there is a CI: no zero-length bars elsewhere
            x, y, below, above = zip(*errs)
            ax.errorbar(x, y, yerr=[below, above], fmt="none", ecolor="black", elinewidth=1, capsize=3)
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels([name for name, _ in runs], rotation=30, ha="right")
    ax.set_ylabel("pass@1")
    ax.set_xlim(-0.6, len(runs) - 0.4)
    ax.set_ylim(0, 1.12 * y_top + 0.01)  # room for the numbers above the bars
    seeds = results.get("seeds") or []
    what = f"mean over {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}" if seeds else "one run each"
    ax.set_title(f"pass@1 per run ({what}; error bars: 95% CI)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never on them
    fig.tight_layout()
    return _save(fig, out_path)


def _save(fig, out_path):
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


USAGE = ("usage: python runs/plot.py curves RUN_DIR [RUN_DIR ...] --out=FILE.png\n"
         "       python runs/plot.py comparison RESULTS_JSON --out=FILE.png")

if __name__ == "__main__":
    args = sys.argv[1:]
    out = [a for a in args if a.startswith("--out=")]
    args = [a for a in args if not a.startswith("--out=")]
    if len(out) != 1 or len(args) < 2 or args[0] not in ("curves", "comparison") or \
            (args[0] == "comparison" and len(args) != 2) or any(a.startswith("-") for a in args):
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    out_path = out[0][len("--out="):]
    try:
        if args[0] == "curves":
            path = plot_curves(args[1:], out_path)
        else:
            if not os.path.isfile(args[1]):
                raise FileNotFoundError(f"{args[1]}: no such file")
            with open(args[1]) as f:
                try:
                    results = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{args[1]}: not JSON ({e.msg})") from None
            path = plot_comparison(results, out_path)
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    print(f"wrote {path}")
