"""Every test (and every process a test starts) keeps compiled decoding programs in a temporary folder,
never in the user's ~/.cache (decoder.cache_dir); and no test leaves flush-to-zero on for the next."""

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _program_cache(tmp_path_factory):
    before = os.environ.get("SAKIMI_CACHE_DIR")
    os.environ["SAKIMI_CACHE_DIR"] = str(tmp_path_factory.mktemp("sakimi-cache"))
    yield
    if before is None:
        del os.environ["SAKIMI_CACHE_DIR"]
    else:
        os.environ["SAKIMI_CACHE_DIR"] = before


@pytest.fixture(autouse=True)
def _denormals_as_ieee_says():
    """cli.main turns on flush-to-zero for the whole process; a test that runs it in-process must not
    leave that state to the tests after it (hypothesis, for one, refuses to draw floats under it)."""
    yield
    torch.set_flush_denormal(False)


@pytest.fixture
def run(capsys):
    """`--mode prepare_data` in this process: run(*args) -> (exit code, stdout, stderr)."""
    from sakimi_next.cli import main

    def _run(*args):
        rc = main(["--mode", "prepare_data", *map(str, args)])
        out, err = capsys.readouterr()
        return rc, out, err
    return _run
