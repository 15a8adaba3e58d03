"""The command line: --mode test and bad input."""

import math
import subprocess
import sys

from sakimi_next.cli import main


def test_mode_test_prints_everything(capsys):
    assert main(["--config", "tiny_5m", "--mode", "test", "--batch-size", "1", "--seq-len", "64",
                 "--device", "cpu", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    for needle in ("configuration", "vocab_size", "3 linear : 1 full", "Gated DeltaNet layer",
                   "Gated Attention layer", "SwiGLU MLP", "LM head (tied to the embedding)", "4,456,240",
                   "device: cpu", "kernel: chunk", "logits (1, 64, 2048)", "tokens/s"):
        assert needle in out, needle
    loss = float(out.split("loss: ")[1].split()[0])
    assert abs(loss - math.log(2048)) < 0.3


def test_disable_fast_kernels(capsys):
    assert main(["--config", "tiny_5m", "--mode", "test", "--batch-size", "1", "--seq-len", "8",
                 "--disable-fast-kernels"]) == 0
    assert "kernel: recurrent" in capsys.readouterr().out


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sakimi_next", *args], capture_output=True, text=True, timeout=300)


def test_unknown_preset_exit_2():
    r = run_cli("--config", "tiny_1m", "--mode", "test")
    assert r.returncode == 2
    assert r.stderr.strip() == ("error: unknown preset 'tiny_1m'; choose one of: "
                                "tiny_5m, tiny_10m, tiny_10m_moe, small_50m")
    assert "Traceback" not in r.stderr


def test_bad_sizes_exit_2():
    for args in (["--seq-len", "0"], ["--batch-size", "-1"], ["--seq-len", "999999"], ["--device", "cuda:7"]):
        r = run_cli("--config", "tiny_5m", "--mode", "test", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ")


def test_kernel_choices_are_the_kernels():
    """The parser lists the kernels without importing torch; the list must be kernels.KERNELS."""
    from sakimi_next.commands.common import KERNELS
    from sakimi_next.kernels import KERNELS as LIBRARY_KERNELS

    assert KERNELS == LIBRARY_KERNELS


def test_every_export_format_is_a_module_of_export():
    """--mode export dispatches through export.FORMATS: each name is a module there with `export(settings)`."""
    import importlib

    from sakimi_next.export import FORMATS

    for name in FORMATS:
        assert callable(importlib.import_module(f"sakimi_next.export.{name}").export)
