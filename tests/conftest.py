import pytest
import torch


@pytest.fixture(autouse=True)
def _denormals_as_ieee_says():
    """cli.main turns on flush-to-zero for the whole process; a test that runs it in-process must not
    leave that state to the tests after it (hypothesis, for one, refuses to draw floats under it)."""
    yield
    torch.set_flush_denormal(False)
