"""configurator.py as the training scripts use it: a tiny script with one setting of each type is
exec'd in a subprocess, and its final settings, stdout, stderr and exit code are checked."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configurator import ConfigError, apply_overrides, declared_types

CONFIGURATOR = Path(__file__).resolve().parents[1] / "configurator.py"

SCRIPT = f"""
batch_size = 8              # int
learning_rate = 3e-4        # float
compile = False             # bool, and shadows the builtin compile() as in nanoGPT
out_dir = 'out'             # str
s3_uri: str | None = None   # a None default needs a type
max_length: int | None = None
top_k: int | None = 200     # an annotation also lets a non-None default take None
betas = (0.9, 0.95)         # tuple
#   (a comment line that continues the one above)
MODES = ('a', 'b')  # a constant, not a setting
_names_before = set(globals())
exec(open({str(CONFIGURATOR)!r}).read())
_leaked = sorted(k for k in set(globals()) - _names_before - {{'_names_before'}} if not k.startswith('__'))
print('RESULT', repr(dict(batch_size=batch_size, learning_rate=learning_rate, compile=compile, out_dir=out_dir,
                          s3_uri=s3_uri, max_length=max_length, top_k=top_k, betas=betas, leaked=_leaked)))
"""

DEFAULTS = dict(batch_size=8, learning_rate=3e-4, compile=False, out_dir="out", s3_uri=None, max_length=None,
                top_k=200, betas=(0.9, 0.95))
TYPES = dict(s3_uri=(str, type(None)), max_length=(int, type(None)), top_k=(int, type(None)))


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
                          s3_uri="s3://bucket/prefix?x=1", max_length=512, top_k=200, betas=(0.8, 0.9), leaked=[])
    assert isinstance(result["learning_rate"], float)                  # int converted for a float default
    assert "Overriding: batch_size = 16" in p.stdout


def test_values_containing_equals_and_none(run):
    p, result = run("--out_dir=a=b", "--s3_uri='k=v'", "--max_length=None", "--top_k=None")
    assert p.returncode == 0, p.stderr
    assert (result["out_dir"], result["s3_uri"], result["max_length"], result["top_k"]) == ("a=b", "k=v", None, None)
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
    ("--batch_size=None", "--batch_size expects int, got 'None'"),      # None only where the type says so
    ("--max_length=abc", "--max_length expects int or None, got 'abc'"),  # a None default is typed too
    ("--max_length=2.5", "--max_length expects int or None, got '2.5'"),
    ("--top_k=[1]", "--top_k expects int or None, got '[1]'"),
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
    cfg.write_text("s3_uri = 5\n")                                    # str | None: the raw-text rule is for argv only
    p, _ = run(str(cfg))
    check_error(p, "s3_uri in", "typo_cfg.py", "expects str or None, got 5")


def test_none_default_without_a_type_is_refused(tmp_path):
    """A fork that adds `foo = None` learns at once that the setting needs a type."""
    script = tmp_path / "train_tiny.py"
    script.write_text(SCRIPT.replace("batch_size = 8 ", "foo = None\nbatch_size = 8 "))
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    check_error(p, "setting 'foo' defaults to None but has no type", "foo: int | None = None")


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
    assert "--learning_rate=0.0003  (float)" in p.stdout and "--s3_uri=None  (str | None)" in p.stdout
    assert "--top_k=200  (int | None)  an annotation also lets a non-None default take None" in p.stdout
    assert "--batch_size=8  (int)  int\n" in p.stdout and "--max_length=None  (int | None)\n" in p.stdout  # none
    assert "--betas=(0.9, 0.95)  (tuple)  tuple (a comment line that continues the one above)" in p.stdout
    assert "MODES" not in p.stdout  # upper-case names are constants
    p, _ = run("--MODES=('c',)")
    check_error(p, "unknown config key 'MODES'")


def test_apply_overrides_in_process(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("batch_size = 2\n")
    out = apply_overrides(dict(DEFAULTS), [str(cfg), "--learning_rate=2", "--out_dir=x=y"], types=TYPES)
    assert out == dict(DEFAULTS, batch_size=2, learning_rate=2.0, out_dir="x=y")
    assert DEFAULTS["batch_size"] == 8                                  # input not modified
    with pytest.raises(ConfigError, match="unknown config key 'nope'"):
        apply_overrides(DEFAULTS, ["--nope=1"], types=TYPES)
    with pytest.raises(ConfigError, match="setting 'max_length' defaults to None but has no type"):
        apply_overrides(DEFAULTS, [])


def test_declared_types_read_from_the_source(tmp_path):
    """Annotations come from the script's text (Python 3.14 evaluates module annotations lazily),
    also inside `if __name__ == "__main__":` where eval.py and sample.py keep their settings."""
    script = tmp_path / "s.py"
    script.write_text("a: int | None = None\nb = 1\nif __name__ == '__main__':\n    c: float | None = 2.0\n"
                      "    d: str = 'x'\ndef f():\n    e: int = 1\n")
    assert declared_types(str(script)) == {"a": (int, type(None)), "c": (float, type(None)), "d": (str,)}
    script.write_text("a: Optional[int] = None\n")
    with pytest.raises(ConfigError, match="s.py:1: unsupported setting annotation 'Optional\\[int\\]'"):
        declared_types(str(script))
