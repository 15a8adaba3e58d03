"""scripts/vllm_check.py is for a machine with vLLM and a GPU; here this project's own `--mode serve`
stands in for `vllm serve` (--server-cmd), so the export, the wait for /health, the requests through the
official openai client, the comparison and the exit codes are all exercised."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sakimi_next.checkpoint import load_weights
from sakimi_next.model import Qwen3NextForCausalLM
from sakimi_next.pretrained import read_model

from .helpers import make_checkpoint
from .serve_support import make_served_checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "vllm_check.py"
OUR_SERVER = ("{python} -m sakimi_next --mode serve --resume-from {model} --host 127.0.0.1 --port {port} "
              "--model-name {name} --device cpu --threads 1")
PROMPTS = ["--prompt", "Return the", "--prompt", "def", "--prompt", "The for statement"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_served_checkpoint(tmp_path_factory.mktemp("vllm-check"))


def check(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args, "--device", "cpu", "--max-tokens", "12",
                           "--startup-timeout", "300", *PROMPTS], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_same_model_matches(checkpoint, tmp_path):
    r = check(str(checkpoint), "--out-dir", str(tmp_path / "hf"), "--server-cmd", OUR_SERVER)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(" match ") == 3 and "matched 3 of 3 prompts" in r.stdout
    assert (tmp_path / "hf" / "config.json").is_file()  # exported first, in the default (Qwen3.5) layout
    assert "Qwen3_5ForCausalLM" in (tmp_path / "hf" / "config.json").read_text()


@pytest.mark.slow
def test_another_model_is_a_mismatch(checkpoint, tmp_path):
    """The server runs a slightly different model: the script says where the texts part and exits 1."""
    files = read_model(checkpoint)
    model = Qwen3NextForCausalLM(files.config)
    load_weights(model, files.tensors, checkpoint)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    other = make_checkpoint(tmp_path / "other", model, files.tokenizer())
    served = OUR_SERVER.replace("{model}", str(other))
    r = check(str(checkpoint), "--out-dir", str(tmp_path / "hf"), "--server-cmd", served)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "MISMATCH" in r.stdout and "the same for" in r.stdout and "matched 3 of 3" not in r.stdout


def test_a_server_that_dies_is_reported(tmp_path):
    from sakimi_next.tokenizer import train_tokenizer

    from .helpers import english_text, small_config

    tokenizer = train_tokenizer([english_text(20_000)], 300)
    tokenizer.save(tmp_path / "tokenizer.json")
    ck = make_checkpoint(tmp_path / "run", Qwen3NextForCausalLM(small_config(vocab_size=300)), tokenizer)
    dying = "{python} -c \"import sys; print('no GPU here'); sys.exit(3)\""
    r = check(str(ck), "--out-dir", str(tmp_path / "hf"), "--server-cmd", dying)
    assert r.returncode == 2
    assert "no GPU here" in r.stderr and "error: the server exited with code 3 before it was ready" in r.stderr
