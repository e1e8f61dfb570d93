"""runs/plot.py: the curves of hand-written metrics.jsonl files and the study's comparison from a
hand-written results.json become non-empty PNG files; a resumed run's repeated iterations keep
their last value; bad input is a one-line error."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "runs"))
import plot  # noqa: E402  (runs/plot.py)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir, rows):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(run_dir)


def stage_rows(scale=1.0):
    rows = []
    for it in range(10, 110, 10):
        rows.append({"iter": it, "train/loss": scale * 3.0 / it ** 0.3, "train/head_loss": [1.0, 2.0], "lr": 1e-3})
        if it % 50 == 0:
            rows.append({"iter": it, "val/loss": scale * 3.2 / it ** 0.3, "val/best_loss": 1.0})
    return rows


def is_png(path):
    with open(path, "rb") as f:
        head = f.read(8)
    return head == PNG_MAGIC and os.path.getsize(path) > 1000


def test_read_curves_keeps_the_last_value_of_a_repeated_iteration(tmp_path):
    rows = stage_rows()
    rows.append({"iter": 90, "train/loss": 0.123})  # resumed from iteration 80: 90 and 100 logged again
    rows.append({"iter": 100, "val/loss": 0.456})
    c = plot.read_curves(write_metrics(tmp_path / "run", rows))
    assert c["train_key"] == "train/loss"
    assert [it for it, _ in c["train"]] == list(range(10, 110, 10))
    assert dict(c["train"])[90] == 0.123 and dict(c["val"]) == {50: pytest.approx(3.2 / 50 ** 0.3), 100: 0.456}
    critic = plot.read_curves(write_metrics(tmp_path / "critic", [{"iter": 5, "train/value_mse": 0.25},
                                                                   {"iter": 5, "val/loss": 0.24}]))
    assert critic["train_key"] == "train/value_mse" and critic["train"] == [(5, 0.25)] and critic["val"] == [(5, 0.24)]


def test_short_names():
    assert plot.short_names(["out/a/seed1/baseline", "out/a/seed1/rho1"]) == ["baseline", "rho1"]
    assert plot.short_names(["out/a/seed1/baseline", "out/a/seed2/baseline"]) == ["seed1/baseline", "seed2/baseline"]


def test_plot_curves_writes_a_png(tmp_path):
    runs = [write_metrics(tmp_path / "seed1" / "baseline", stage_rows()),
            write_metrics(tmp_path / "seed2" / "baseline", stage_rows(0.9)),
            write_metrics(tmp_path / "seed1" / "critic",  # MSE ~0.2 next to CE ~1: the log scale
                          [{"iter": i, "train/value_mse": 0.25 - i / 1000} for i in range(10, 110, 10)]
                          + [{"iter": 100, "val/loss": 0.18}])]
    out = tmp_path / "figs" / "curves.png"
    assert plot.plot_curves(runs, str(out)) == str(out)
    assert is_png(out)


def test_plot_comparison_writes_a_png(tmp_path):
    results = {"seeds": [1, 2, 3], "runs": {
        "base": {"what": "base model", "mean": {"pass1_greedy": 0.40, "pass1_sampled": 0.20},
                 "ci": {"pass1_greedy": [0.33, 0.47], "pass1_sampled": [0.17, 0.23]}},
        "baseline": {"what": "stage 0", "mean": {"pass1_greedy": 0.45, "pass1_sampled": None},
                     "ci": {"pass1_greedy": [0.38, 0.52], "pass1_sampled": None}},
        "rho1": {"what": "stage 3", "mean": {"pass1_greedy": 0.5, "pass1_sampled": 0.3}},  # no "ci": no error bars
        "critic": {"what": "stage 1", "mean": {"pass1_greedy": None, "pass1_sampled": None}},  # left out
    }}
    out = tmp_path / "comparison.png"
    assert plot.plot_comparison(results, str(out)) == str(out)
    assert is_png(out)
    with pytest.raises(ValueError, match="no run"):
        plot.plot_comparison({"runs": {"critic": results["runs"]["critic"]}}, str(tmp_path / "none.png"))


def run_plot(*args):
    return subprocess.run([sys.executable, "runs/plot.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_plot_script(tmp_path):
    run = write_metrics(tmp_path / "baseline", stage_rows())
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"seeds": [1], "runs": {"baseline": {"what": "stage 0", "mean": {
        "pass1_greedy": 0.4, "pass1_sampled": 0.2}, "ci": {"pass1_greedy": [0.3, 0.5], "pass1_sampled": [0.1, 0.3]}}}}))
    r = run_plot("curves", run, f"--out={tmp_path / 'c.png'}")
    assert r.returncode == 0 and r.stdout.strip() == f"wrote {tmp_path / 'c.png'}", r.stderr
    assert is_png(tmp_path / "c.png")
    r = run_plot("comparison", str(results), f"--out={tmp_path / 'p.png'}")
    assert r.returncode == 0 and is_png(tmp_path / "p.png"), r.stderr
    # a directory without metrics.jsonl: one line, exit 2, nothing written
    r = run_plot("curves", run, str(tmp_path / "nothing"), f"--out={tmp_path / 'x.png'}")
    assert r.returncode == 2 and r.stderr == f"plot.py: error: {tmp_path / 'nothing'}: no metrics.jsonl (not a run " \
                                             f"directory, or it has logged nothing yet)\n"
    assert not os.path.exists(tmp_path / "x.png")
    r = run_plot("curves", run)  # no --out
    assert r.returncode == 2 and r.stderr.startswith("usage:")
