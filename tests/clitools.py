"""Shared helpers for the CLI tests: run ``kse`` in process and check its one-line errors."""

import contextlib
import io
import os

import pytest
import torch

from kse.cli import main


def run(argv):
    """``kse.cli.main(argv)`` in process; returns ``(exit code, stdout, stderr)``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def ok(argv):
    """Run ``argv``, expect success; returns ``(stdout, stderr)``."""
    code, out, err = run(argv)
    assert code == 0, err
    assert "Traceback" not in err
    return out, err


def one_error_line(argv) -> str:
    code, out, err = run(argv)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread and no torchrun environment for a whole test module."""
    # NOTE: other jobs may share this machine's cores; one thread keeps the timings sane
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ.pop("WORLD_SIZE", None)
    yield
    torch.set_num_threads(threads)
