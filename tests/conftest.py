"""Every test (and every process a test starts) keeps compiled decoding programs in a temporary folder,
never in the user's ~/.cache (decoder.cache_dir)."""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _program_cache(tmp_path_factory):
    before = os.environ.get("SAKIMI_CACHE_DIR")
    os.environ["SAKIMI_CACHE_DIR"] = str(tmp_path_factory.mktemp("sakimi-cache"))
    yield
    if before is None:
        del os.environ["SAKIMI_CACHE_DIR"]
    else:
        os.environ["SAKIMI_CACHE_DIR"] = before
