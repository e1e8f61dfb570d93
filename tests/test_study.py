"""runs/summarize.py: the study's paired statistics on hand-made results, and the whole table
from hand-made run directories (eval.json with per-problem results)."""

import json
import os

import pytest

from runs import summarize


def per_problem(greedy, sampled, samples=4):
    """{problem_id: {"greedy": 0/1, "sampled": fraction}} as summarize.numbers reads it."""
    return {f"p{i}": {"greedy": float(g), "sampled": s / samples} for i, (g, s) in enumerate(zip(greedy, sampled))}


def test_identical_results_give_a_ci_of_exactly_zero():
    a = per_problem([1, 0, 1, 1, 0, 0], [4, 1, 3, 2, 0, 1])
    for metric in ("greedy", "sampled"):
        p = summarize.paired({"s1": a}, {"s1": a}, metric)
        assert (p["diff"], p["lo"], p["hi"], p["se"], p["mde"]) == (0.0, 0.0, 0.0, 0.0, 0.0)
        assert p["n_problems"] == 6 and p["n_seeds"] == 1


def test_a_constant_shift_is_recovered():
    control = per_problem([0] * 8, [0, 1, 2, 1, 0, 2, 1, 0])
    run = per_problem([1] * 8, [1, 2, 3, 2, 1, 3, 2, 1])  # every problem: one more correct sample of 4
    p = summarize.paired({"s1": run, "s2": run}, {"s1": control, "s2": control}, "sampled")
    assert p["diff"] == pytest.approx(0.25) and p["lo"] == pytest.approx(0.25) and p["hi"] == pytest.approx(0.25)
    assert p["se"] == 0.0 and p["n_seeds"] == 2
    g = summarize.paired({"s1": run}, {"s1": control}, "greedy")
    assert (g["diff"], g["lo"], g["hi"]) == (1.0, 1.0, 1.0)


def test_paired_ci_mde_and_seed_pooling():
    """Differences +1 on half the problems, 0 on the others: mean 0.5, SE = sd / sqrt(n), MDE 2.8 SE,
    a bootstrap CI around 0.5 that excludes 0; only the seeds both runs have are pooled."""
    n = 40
    control = per_problem([0] * n, [0] * n)
    run = per_problem([1, 0] * (n // 2), [0] * n)
    p = summarize.paired({"s1": run, "s3": run}, {"s1": control, "s2": control}, "greedy")
    sd = (0.25 * n / (n - 1)) ** 0.5
    assert p["n_seeds"] == 1 and p["diff"] == pytest.approx(0.5)
    assert p["se"] == pytest.approx(sd / n ** 0.5) and p["mde"] == pytest.approx(2.8 * sd / n ** 0.5)
    assert 0.2 < p["lo"] < 0.5 < p["hi"] < 0.8
    assert summarize.paired({"s1": run}, {"s2": control}, "greedy") is None  # no common seed


def write_run(d, greedy, sampled, samples=4, it=250):
    os.makedirs(d, exist_ok=True)
    pp = {f"p{i}": {"greedy": bool(g), "sampled_correct": s, "samples": samples} for i, (g, s) in
          enumerate(zip(greedy, sampled))}
    with open(os.path.join(d, "eval.json"), "w") as f:
        json.dump({"pass@1_greedy": sum(greedy) / len(greedy), "pass@1_sampled": sum(sampled) / samples / len(sampled),
                   "pass@k": {}, "val_loss": 0.3, "iter": it, "per_problem": pp}, f)


def test_tables_and_decision_rule_from_run_directories(tmp_path):
    n = 60
    for seed in ("seed1", "seed2"):
        write_run(tmp_path / seed / "verifiable_uniform", [0, 1] * (n // 2), [1, 2] * (n // 2))
        write_run(tmp_path / seed / "baseline", [0, 1] * (n // 2), [1, 1] * (n // 2))
        write_run(tmp_path / seed / "oracle_prefix", [1, 1] * (n // 2), [3, 3] * (n // 2))
        write_run(tmp_path / seed / "verifiable_td", [0, 1] * (n // 2), [1, 2] * (n // 2))
    table = summarize.main(str(tmp_path))
    md = (tmp_path / "results.md").read_text()
    assert "Decision: DETECTABLE: oracle_prefix beats verifiable_uniform" in md
    assert table["oracle_prefix"]["paired"]["verifiable_uniform"]["sampled"]["diff"] == pytest.approx(1.5 / 4)
    assert table["verifiable_td"]["paired"]["verifiable_uniform"]["greedy"]["diff"] == 0.0
    assert table["verifiable_td"]["mean"]["iter"] == 250  # the iteration evaluated is in the table
    lo, hi = table["baseline"]["ci"]["pass1_sampled"]
    assert lo == hi == pytest.approx(0.25)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["seeds"] == ["seed1", "seed2"] and results["decision"]["rule"] == list(summarize.PRIMARY)
    # a control that does not beat uniform: the verdict says the study cannot detect the effect
    for seed in ("seed1", "seed2"):
        write_run(tmp_path / seed / "oracle_prefix", [0, 1] * (n // 2), [1, 2] * (n // 2))
    summarize.main(str(tmp_path))
    assert "Decision: NOT DETECTABLE" in (tmp_path / "results.md").read_text()
