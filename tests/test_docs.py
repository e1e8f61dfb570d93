"""The commands the README and the scripts' docstrings show work as written after `make study`:
every script and config file they name exists, every --key they pass is a setting of that script,
and every path under out/arith/ they read is one the study writes (runs/arith.sh's layout, which
the configs and the scripts' defaults share). Static checks, no process: the commands themselves
are run by hand on a fresh clone before a release (dev/LOG.md)."""

import ast
import glob
import os
import re
import shlex

import pytest

from tests.helpers import ROOT

ENTRY_POINTS = ["train_baseline.py", "train_critic.py", "train_verifiable.py", "train_rho1.py", "eval.py",
                "sample.py", "export.py", "bench.py", "runs/summarize.py", "runs/plot.py",
                *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "data", "*", "prepare.py")))]


def study_dirs():
    """The run directories runs/arith.sh writes for its default seed (1337), and the shared base."""
    text = open(os.path.join(ROOT, "runs", "arith.sh")).read()
    names = re.findall(r'^\s+"([a-z0-9_]+)\|', text, flags=re.M)
    assert len(names) >= 14, names
    return {"out/arith/base"} | {f"out/arith/seed1337/{n}" for n in names}


def settings_of(script):
    """The --key names a script takes: its module-level settings (also those in its __main__ block),
    or its DEFAULTS dict (the data prepare scripts)."""
    tree = ast.parse(open(os.path.join(ROOT, script)).read())
    names, body = set(), list(tree.body)
    while body:
        node = body.pop(0)
        if isinstance(node, ast.If):
            body[:0] = node.body + node.orelse
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name) and t.id == "DEFAULTS" and isinstance(node.value, ast.Dict):
                    return {k.value for k in node.value.keys}
                if isinstance(t, ast.Name) and not t.id.startswith("_") and not t.id.isupper():
                    names.add(t.id)
    return names


def commands():
    """(where, argv) of every `python X.py ...` / `torchrun ... X.py ...` line of the README's code
    blocks and of the entry points' docstrings (continued lines joined)."""
    sources = [("README.md", open(os.path.join(ROOT, "README.md")).read())]
    sources += [(s, ast.get_docstring(ast.parse(open(os.path.join(ROOT, s)).read())) or "") for s in ENTRY_POINTS]
    found = []
    for where, text in sources:
        text = re.sub(r"\\\n\s*", " ", text)
        for line in text.splitlines():
            line = line.split("  #")[0].strip()
            if re.match(r"^(python|torchrun)\s", line):
                found.append((where, shlex.split(line)))
    return found


COMMANDS = commands()


def test_commands_were_found():
    assert len(COMMANDS) > 30 and {w for w, _ in COMMANDS} >= {"README.md", "train_baseline.py", "eval.py"}


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[f"{w}:{' '.join(a)[:60]}" for w, a in COMMANDS])
def test_command_names_real_scripts_configs_and_settings(where, argv):
    script = next(a for a in argv if a.endswith(".py"))
    assert os.path.isfile(os.path.join(ROOT, script)), f"{where}: {script} does not exist"
    settings = settings_of(script)
    for arg in argv[argv.index(script) + 1:]:
        if arg.startswith("config/"):
            assert os.path.isfile(os.path.join(ROOT, arg)), f"{where}: {arg} does not exist"
        elif arg.startswith("--") and script != "runs/plot.py":
            key = arg[2:].split("=")[0]
            assert key in settings, f"{where}: {' '.join(argv)}: {script} has no setting {key!r}"


def test_study_paths_are_ones_the_study_writes():
    """Every out/arith/... path in the commands, configs and entry points' defaults is in the study's
    layout: out/arith/base, out/arith/seed1337/<a run of runs/arith.sh> (or a file in one), or the
    study's own outputs."""
    layout = study_dirs() | {"out/arith/results.json", "out/arith/results.md", "out/arith/report.md",
                             "out/arith/seed1337", "out/arith"}
    texts = {p: open(os.path.join(ROOT, p)).read() for p in ["README.md", *ENTRY_POINTS,
                                                             *sorted(glob.glob("config/arith_*.py", root_dir=ROOT))]}
    checked = 0
    for where, text in texts.items():
        for path in re.findall(r"out/arith[A-Za-z0-9_./*{}]*", text):
            path = path.rstrip("./")
            if "*" in path or "{" in path:  # a pattern (seed*/...), not a path
                continue
            checked += 1
            assert path in layout or os.path.dirname(path) in layout, f"{where}: {path} is not written by make study"
    assert checked > 10


def test_configs_chain_the_study():
    """The arith configs read what the study (and the config before them) writes, so that
    `python train_X.py config/arith_X.py` runs after `make study` with no other argument."""
    layout = study_dirs()
    for path in sorted(glob.glob(os.path.join(ROOT, "config", "arith_*.py"))):
        settings = {}
        exec(open(path).read(), {}, settings)
        for key in ("init_from", "ref_init_from"):
            if key in settings and settings[key] != "scratch":
                assert settings[key] in layout, f"{path}: {key}={settings[key]!r} is not a study run"
