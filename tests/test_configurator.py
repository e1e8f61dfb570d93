"""configurator.py as the training scripts use it: a tiny script with one setting of each type is
exec'd in a subprocess, and its final settings, stdout, stderr and exit code are checked."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configurator import ConfigError, apply_overrides

CONFIGURATOR = Path(__file__).resolve().parents[1] / "configurator.py"

SCRIPT = f"""
batch_size = 8              # int
learning_rate = 3e-4        # float
compile = False             # bool, and shadows the builtin compile() as in nanoGPT
out_dir = 'out'             # str
s3_uri = None               # None: any type
max_length = None
betas = (0.9, 0.95)         # tuple
_names_before = set(globals())
exec(open({str(CONFIGURATOR)!r}).read())
_leaked = sorted(k for k in set(globals()) - _names_before - {{'_names_before'}} if not k.startswith('__'))
print('RESULT', repr(dict(batch_size=batch_size, learning_rate=learning_rate, compile=compile, out_dir=out_dir,
                          s3_uri=s3_uri, max_length=max_length, betas=betas, leaked=_leaked)))
"""

DEFAULTS = dict(batch_size=8, learning_rate=3e-4, compile=False, out_dir="out", s3_uri=None, max_length=None,
                betas=(0.9, 0.95))


@pytest.fixture
def run(tmp_path):
    script = tmp_path / "train_tiny.py"
    script.write_text(SCRIPT)

    def run(*args, rank=None):
        env = {k: v for k, v in os.environ.items() if k != "RANK"}
        if rank is not None:
            env["RANK"] = str(rank)
        p = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=30)
        result = None
        for line in p.stdout.splitlines():
            if line.startswith("RESULT "):
                result = ast.literal_eval(line[len("RESULT "):])
        return p, result
    return run


def check_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "RESULT" not in p.stdout                                     # stopped before any work
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("train_tiny.py: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_defaults_and_no_leaked_names(run):
    p, result = run()
    assert p.returncode == 0, p.stderr
    assert result == dict(DEFAULTS, leaked=[])


def test_argv_overrides_and_fixed_nanogpt_limitations(run):
    p, result = run("--batch_size=16", "--learning_rate=1", "--compile=True", "--out_dir=123",
                    "--s3_uri=s3://bucket/prefix?x=1", "--max_length=512", "--betas=[0.8, 0.9]")
    assert p.returncode == 0, p.stderr
    assert result == dict(batch_size=16, learning_rate=1.0, compile=True, out_dir="123",
                          s3_uri="s3://bucket/prefix?x=1", max_length=512, betas=(0.8, 0.9), leaked=[])
    assert isinstance(result["learning_rate"], float)                  # int converted for a float default
    assert "Overriding: batch_size = 16" in p.stdout


def test_values_containing_equals_and_none(run):
    p, result = run("--out_dir=a=b", "--s3_uri='k=v'", "--max_length=None")
    assert p.returncode == 0, p.stderr
    assert (result["out_dir"], result["s3_uri"], result["max_length"]) == ("a=b", "k=v", None)
    p, result = run("--s3_uri=s3://b/p", "--s3_uri=None")              # later override wins, None allowed
    assert result["s3_uri"] is None


def test_config_file_then_argv_in_order(run, tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("import math\n_n = 2\nbatch_size = 4 * _n\nlearning_rate = 1\nout_dir = 'from_cfg'\n"
                   "def _helper():\n    return 1\n")
    p, result = run(str(cfg), "--batch_size=32")
    assert p.returncode == 0, p.stderr
    assert (result["batch_size"], result["learning_rate"], result["out_dir"]) == (32, 1.0, "from_cfg")
    p, result = run("--batch_size=32", str(cfg))                        # left to right: the file wins
    assert result["batch_size"] == 8 and result["leaked"] == []


def test_overriding_lines_only_on_rank_zero(run):
    p, _ = run("--batch_size=16", rank=1)
    assert p.returncode == 0 and "Overriding" not in p.stdout
    p, _ = run("--batch_size=16", rank=0)
    assert "Overriding: batch_size = 16" in p.stdout


def test_unknown_key_in_argv(run):
    p, _ = run("--batch_size=4", "--bogus=1")
    check_error(p, "unknown config key 'bogus'", "known: batch_size, betas, compile")


def test_unknown_key_in_config_file(run, tmp_path):
    cfg = tmp_path / "bad_cfg.py"
    cfg.write_text("batch_size = 4\nlearnig_rate = 1e-3\n")
    p, _ = run(str(cfg))
    check_error(p, "unknown config key 'learnig_rate'", "bad_cfg.py")


@pytest.mark.parametrize("arg, needle", [
    ("--learning_rate=abc", "--learning_rate expects float, got 'abc'"),
    ("--compile=1", "--compile expects bool, got '1'"),                 # no int-for-bool
    ("--batch_size=2.5", "--batch_size expects int, got '2.5'"),
    ("--batch_size=True", "--batch_size expects int, got 'True'"),
    ("--batch_size=None", "--batch_size expects int, got 'None'"),      # None only for None defaults
    ("--learning_rate", "expected --key=value, got '--learning_rate'"),
    ("batch_size=3", "expected a config file or --key=value"),
])
def test_wrong_type_or_form(run, arg, needle):
    p, _ = run(arg)
    check_error(p, needle)


def test_wrong_type_in_config_file(run, tmp_path):
    cfg = tmp_path / "typo_cfg.py"
    cfg.write_text("compile = 'yes'\n")
    p, _ = run(str(cfg))
    check_error(p, "compile in", "typo_cfg.py", "expects bool")


def test_missing_and_broken_config_file(run, tmp_path):
    p, _ = run("config/nope.py")
    check_error(p, "config file not found", "config/nope.py")
    cfg = tmp_path / "broken_cfg.py"
    cfg.write_text("batch_size = (\n")
    p, _ = run(str(cfg))
    check_error(p, "broken_cfg.py", "SyntaxError")


def test_help(run):
    p, result = run("--help")
    assert p.returncode == 0 and result is None
    assert "--learning_rate=0.0003" in p.stdout and "--s3_uri=None" in p.stdout


def test_apply_overrides_in_process(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("batch_size = 2\n")
    out = apply_overrides(dict(DEFAULTS), [str(cfg), "--learning_rate=2", "--out_dir=x=y"])
    assert out == dict(DEFAULTS, batch_size=2, learning_rate=2.0, out_dir="x=y")
    assert DEFAULTS["batch_size"] == 8                                  # input not modified
    with pytest.raises(ConfigError, match="unknown config key 'nope'"):
        apply_overrides(DEFAULTS, ["--nope=1"])
