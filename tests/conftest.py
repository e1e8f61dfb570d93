"""Fixtures shared by several test files."""

import os
import runpy
import sys

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Micro models run fastest on one thread; two threads on a busy 2-core box can be 10x slower.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run_main(monkeypatch, capsys):
    """run_main(script, *args, cwd=repo root) runs a repo script in this process as `python
    script args...` does (runpy as __main__, sys.argv set) and returns (exit code, stdout, stderr).
    For runs that stop before any real work (bad input): no new process, no second torch import."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(script, *args, cwd=root):
        path = os.path.join(root, script)
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", [path, *args])
        try:
            runpy.run_path(path, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run
