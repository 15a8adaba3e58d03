"""Setting up a GPU machine, tested without one: scripts/train_gpu.sh (in a dry run, with a fake nvidia-smi
and a fake system torch), the choices and checks of scripts/gpu_env.py, and `--device cuda:N`."""

import importlib.util
import subprocess
import sys

import pytest
import torch

from sakimi_next.cli import main
from sakimi_next.kernels import FLA_PIN
from sakimi_next.util import UserError, resolve_device

from . import fake_fla
from .helpers import ROOT

spec = importlib.util.spec_from_file_location("gpu_env", ROOT / "scripts" / "gpu_env.py")
gpu_env = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_env)

CU126 = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
CU130 = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130"


def test_missing_cuda_index_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(UserError, match=r"^device 'cuda:2' does not exist: this machine has 2 CUDA devices "
                                        r"\(cuda:0 to cuda:1\)$"):
        resolve_device("cuda:2")
    assert main(["--mode", "test", "--config", "tiny_5m", "--device", "cuda:7"]) == 2
    assert capsys.readouterr().err == ("error: device 'cuda:7' does not exist: this machine has 2 CUDA devices "
                                       "(cuda:0 to cuda:1)\n")


def torch_info(version, cuda, available):
    return {"version": version, "cuda": cuda, "available": available}


@pytest.mark.parametrize("driver, system, expected, why", [
    ("580.159.03", torch_info("2.11.0+cu130", "13.0", True), "system", "the venv reuses it"),
    ("550.54.15", torch_info("2.11.0+cu130", "13.0", False), CU126, "(CUDA 13.0) does not see the GPU"),
    ("550.54.15", torch_info("2.13.0+cpu", None, False), CU126, "(a CPU build) does not see the GPU"),
    ("570.86.10", torch_info("2.5.1+cu124", "12.4", True), CU126, "2.5.1+cu124 is older than 2.7"),
    ("580.95.05", None, CU130, "has no torch; driver 580.95.05: torch==2.13.0 built for CUDA 13.0"),
    ("525.60.13", None, CU126, "built for CUDA 12.6"),
])
def test_plan_picks_the_torch_the_driver_runs(driver, system, expected, why):
    source, reason = gpu_env.plan(driver, system)
    assert source == expected and why in reason


def test_plan_skips_a_system_triton_fla_refuses_on_hopper():
    """fla refuses to train on a Hopper GPU under Triton 3.4.0-3.7.0 (seen on an H100 with torch 2.11's
    Triton 3.6.0): the venv then gets the pinned torch (Triton 3.7.1), unless fla is not wanted."""
    torch_211 = {**torch_info("2.11.0+cu130", "13.0", True), "triton": "3.6.0"}
    source, why = gpu_env.plan("580.159.04", torch_211, gpu_name="NVIDIA H100 80GB HBM3")
    assert source == CU130 and "comes with Triton 3.6.0, under which fla's backward is wrong on a Hopper GPU" in why
    assert gpu_env.plan("580.159.04", torch_211, gpu_name="NVIDIA H100 80GB HBM3", with_fla=False)[0] == "system"
    assert gpu_env.plan("580.159.04", torch_211, gpu_name="NVIDIA A100-SXM4-80GB")[0] == "system"
    for triton in ("3.7.1", "3.3.1", None):
        assert gpu_env.plan("580.159.04", {**torch_211, "triton": triton}, gpu_name="NVIDIA H200")[0] == "system"
    assert gpu_env.fla_refuses("NVIDIA GH200 480GB", "3.4.0") and not gpu_env.fla_refuses("NVIDIA L4", "3.6.0")


def test_plan_refuses_an_old_driver_and_takes_torch_index():
    with pytest.raises(gpu_env.SetupError, match="driver 470.256.02 is too old for torch==2.13.0"):
        gpu_env.plan("470.256.02", None)
    assert gpu_env.plan("470.256.02", None, "https://example.invalid/whl")[0] == \
        "torch==2.13.0 --index-url https://example.invalid/whl"


def fake_machine(tmp_path, driver: str | None, torch_version: str | None, cuda: str | None, available: bool,
                 triton: str | None = None):
    """A PATH with a fake nvidia-smi of an H200 (none when driver is None) and a PYTHONPATH with a fake system
    torch (and Triton's package metadata)."""
    bin_dir, site = tmp_path / "bin", tmp_path / "site"
    bin_dir.mkdir()
    site.mkdir()
    if driver is not None:
        smi = bin_dir / "nvidia-smi"
        smi.write_text("#!/bin/sh\ncase \"$*\" in\n"
                       f"  *driver_version*) echo 'NVIDIA H200, {driver}' ;;\n"
                       "  *-L*) echo 'GPU 0: NVIDIA H200 (UUID: GPU-0)' ;;\n"
                       "  *) echo 'NVIDIA H200' ;;\nesac\n")
        smi.chmod(0o755)
    if torch_version is not None:
        (site / "torch").mkdir()
        (site / "torch" / "__init__.py").write_text(
            f"__version__ = {torch_version!r}\nclass version:\n    cuda = {cuda!r}\n"
            f"class cuda:\n    is_available = staticmethod(lambda: {available})\n")
    if triton is not None:
        (site / f"triton-{triton}.dist-info").mkdir()
        (site / f"triton-{triton}.dist-info" / "METADATA").write_text(f"Name: triton\nVersion: {triton}\n")
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONPATH": str(site), "PYTHON": sys.executable,
            "DRY_RUN": "1", "HOME": str(tmp_path)}


def train_gpu(env, *args):
    return subprocess.run(["bash", str(ROOT / "scripts" / "train_gpu.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_train_gpu_installs_a_torch_the_driver_runs(tmp_path):
    r = train_gpu(fake_machine(tmp_path, "550.54.15", "2.13.0+cpu", None, False), "smoke")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1:] == [
        f"+ {sys.executable} -m venv .venv-gpu",
        "+ .venv-gpu/bin/pip install -q --upgrade pip",
        f"+ .venv-gpu/bin/pip install -q {CU126}",
        "+ .venv-gpu/bin/pip install -q -e .[fla]",
        "dry run: stopping before the checks",
    ]
    assert "note: the system's torch 2.13.0+cpu (a CPU build) does not see the GPU; driver 550.54.15" in r.stderr


def test_train_gpu_reuses_a_system_cuda_torch(tmp_path):
    env = fake_machine(tmp_path, "580.159.03", "2.11.0+cu130", "13.0", True)
    r = train_gpu({**env, "FLA": "0"}, "setup")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1:] == [f"+ {sys.executable} -m venv --system-site-packages .venv-gpu",
                                         "+ .venv-gpu/bin/pip install -q -e .",
                                         "dry run: stopping before the checks"]


def test_train_gpu_on_hopper_does_not_reuse_a_triton_fla_refuses(tmp_path):
    env = fake_machine(tmp_path, "580.159.03", "2.11.0+cu130", "13.0", True, triton="3.6.0")
    r = train_gpu(env, "setup")
    assert r.returncode == 0, r.stderr
    assert f"+ .venv-gpu/bin/pip install -q {CU130}" in r.stdout.splitlines()
    assert "comes with Triton 3.6.0, under which fla's backward is wrong on a Hopper GPU (NVIDIA H200" in r.stderr
    r = train_gpu({**env, "FLA": "0"}, "setup")  # without fla the system's torch serves
    assert f"+ {sys.executable} -m venv --system-site-packages .venv-gpu" in r.stdout.splitlines()


@pytest.mark.parametrize("driver, args, message", [
    (None, ["smoke"], "error: no nvidia-smi: this script is for NVIDIA GPU machines"),
    ("470.256.02", ["full", "corpus/"], "error: the NVIDIA driver 470.256.02 is too old for torch==2.13.0"),
    ("580.159.03", [], "error: give a mode: bash scripts/train_gpu.sh setup|check|smoke|full"),
    ("580.159.03", ["corpus/"], "error: give a mode"),  # the old form: TEXT without a mode
    ("580.159.03", ["smoke", "corpus/"], "error: only 'full' takes TEXT"),
])
def test_train_gpu_refuses_clearly(tmp_path, driver, args, message):
    r = train_gpu(fake_machine(tmp_path, driver, None, None, False), *args)
    assert r.returncode == 2 and r.stderr.splitlines()[-1].startswith(message), r.stderr
    assert "+ " not in r.stdout  # nothing was installed


@pytest.fixture
def gpu(monkeypatch):
    """This process's torch, made to look like a CUDA build on one GPU."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    fake_fla.uninstall()
    yield monkeypatch
    fake_fla.uninstall()


def test_verify_after_installing(gpu):
    fake_fla.install(gpu, version="0.5.2")
    assert gpu_env.verify(with_fla=True) == (f"torch {torch.__version__} (CUDA 13.0) sees 1 x NVIDIA H200; "
                                             "flash-linear-attention 0.5.2 imports: --kernel auto uses it")
    assert gpu_env.verify(with_fla=False).endswith("sees 1 x NVIDIA H200; FLA=0: the chunk kernel")


def test_verify_says_what_is_wrong(gpu, capsys):
    fake_fla.install(gpu, version="0.4.2")
    with pytest.raises(gpu_env.SetupError, match=r"the fla kernel cannot run: flash-linear-attention 0.4.2 is "
                                                 r"older than 0.5.0; .* \(FLA=0 trains with the chunk kernel"):
        gpu_env.verify(with_fla=True)
    gpu.setattr(torch.cuda, "is_available", lambda: False)
    gpu.setattr(gpu_env, "gpus", lambda: [("NVIDIA H200", "550.54.15")])
    gpu.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(gpu_env.SetupError, match=r"\(CUDA 13.0\) does not see the GPU \(driver 550.54.15, "
                                                 r"CUDA 13.0 needs >= 580\): remove .venv-gpu"):
        gpu_env.verify(with_fla=False)
    gpu.setattr(torch.version, "cuda", None)
    assert gpu_env.main(["verify"]) == 2
    assert capsys.readouterr().err.startswith(f"error: torch {torch.__version__} is a CPU build")


def test_fla_pin_is_pyprojects_extra():
    assert f'fla = ["{FLA_PIN}"]' in (ROOT / "pyproject.toml").read_text()
