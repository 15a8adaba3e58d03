"""`--mode bench`: a smoke run writes its table, bench.json and the plot (no speed is asserted)."""

import json
import math
import re

import pytest
import torch

from sakimi_next.cli import main


@pytest.mark.slow
def test_quick_bench_writes_figures(tmp_path, capsys):
    assert main(["--mode", "bench", "--quick", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "bench.json").read_text())
    figures = results["figures"]
    for key in ("train_8x128", "train_1x2048", "forward_1x2048", "decode_256", "decode_matmul_floor",
                "decode_latency_ratio", "forward_long_memory", "forward_scaling", "mfu"):
        value = figures[key]["ours"]
        assert math.isfinite(value) and value > 0, (key, value)
        assert figures[key]["label"] in out
    assert 0 < figures["mfu"]["ours"] < 100
    split = results["time_split_8x128"]
    assert sum(split.values()) > 0 and split["delta rule kernel"] > 0 and split["MLP"] > 0
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_bad_input(capsys):
    with pytest.raises(SystemExit) as e:  # argparse's choices
        main(["--mode", "bench", "--compare", "vllm"])
    assert e.value.code == 2 and "invalid choice: 'vllm'" in capsys.readouterr().err
    assert main(["--mode", "bench", "--device", "cuda"]) == 2
    assert "--device cpu" in capsys.readouterr().err


def test_training_flops_count_active_parameters():
    """MFU's numerator: 3 x (2 per matmul weight + causal attention + the delta rule's ~7 dk dv per
    value head); an MoE token only meets the experts it is routed to."""
    from sakimi_next.bench import training_flops_per_token
    from sakimi_next.config import preset
    from sakimi_next.model import Qwen3NextForCausalLM, active_parameters

    dense = training_flops_per_token(Qwen3NextForCausalLM(preset("tiny_10m")), 128)
    assert dense == 3 * (2 * 9_425_888 + 2 * 2 * 2 * 64 * 4 * 64 + 6 * 7 * 8 * 64 * 64)
    moe = Qwen3NextForCausalLM(preset("tiny_10m_moe"))
    extra = 2 * (active_parameters(moe.config) - 9_425_888)
    assert training_flops_per_token(moe, 128) == dense + 3 * extra


@pytest.mark.slow
def test_gpu_check_script_runs_small_on_cpu(tmp_path):
    """scripts/gpu_check.py is for a GPU machine; without CUDA it runs the same code small (chunk against
    the recurrent reference), so it cannot rot unseen: every case is really compared and judged."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    r = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "gc.json")], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "gc.json").read_text())
    assert report["passed"] and report["kernel"] == "chunk"
    by_case = {}
    for c in report["checks"]:
        assert c["passed"] and c["tolerance"] > 0
        by_case.setdefault(c["check"], {})[c["quantity"]] = c["value"]
    for case in ("grouped_heads", "one_step", "documents", "grouped_heads_bf16"):
        assert len(by_case[case]) == 8 and 0 < min(by_case[case].values())  # really compared
    assert set(by_case["no_initial_state"]) == {"o", "final_state", "dq", "dk", "dv", "dg", "dbeta"}
    assert max(max(by_case[c].values()) for c in ("grouped_heads", "documents")) < 1e-4  # float32
    assert len(report["end_to_end"]) == 2
    for run in report["end_to_end"].values():
        assert len(run["losses"]) == 3 and run["max_relative_difference"] < 1e-4
    (training,) = (v for k, v in report["training"].items() if k != "matmul_peak_flops")
    assert training["tokens_per_s"] > 0 and 0 < training["mfu"] < 1
    assert "all 41 checks passed" in r.stdout and "[5/5] chunk against the float64 recurrence" in r.stdout


def test_gpu_check_fails_loudly(tmp_path, monkeypatch, capsys):
    """A figure over its tolerance, or a case that raises, is a FAIL row, the others still run, and the exit
    code is 1."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parents[1] / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setattr(gpu_check, "CPU_CASES", {k: gpu_check.CPU_CASES[k] for k in ("one_step", "documents")})
    monkeypatch.setattr(gpu_check, "end_to_end", lambda *args: {})
    monkeypatch.setattr(gpu_check, "speed", lambda *args: {})
    out = str(tmp_path / "gc.json")
    assert gpu_check.main(["--out", out]) == 0
    assert gpu_check.main(["--out", out, "--tolerance-scale", "0"]) == 1  # nothing is exact
    assert "FAIL" in capsys.readouterr().out and json.loads(Path(out).read_text())["passed"] is False

    real = gpu_check.gated_delta_rule

    def broken(kernel, *args):
        if args[0].shape[1] == 1:
            raise RuntimeError("boom")
        return real(kernel, *args)

    monkeypatch.setattr(gpu_check, "gated_delta_rule", broken)
    assert gpu_check.main(["--out", out]) == 1
    printed = capsys.readouterr().out
    assert re.search(r"one_step +RuntimeError: boom +- +- +FAIL", printed) and "1 of 9 checks FAILED" in printed
    assert [c["check"] for c in json.loads(Path(out).read_text())["checks"]].count("documents") == 8


def test_decode_floor_streams_every_matrix_once():
    """The decode ceiling times every matrix a dense step uses: all the trunk's Linear weights and the LM
    head, each once (fused or not), so the figure cannot quietly leave a layer out."""
    from sakimi_next.bench import decode_weights
    from sakimi_next.config import preset
    from sakimi_next.model import Qwen3NextForCausalLM

    for name in ("tiny_5m", "tiny_10m"):
        model = Qwen3NextForCausalLM(preset(name)).eval()
        linear = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
        weights = decode_weights(model)
        assert sum(w.numel() for w in weights) == linear + model.lm_head_weight.numel()
        assert all(w.ndim == 2 for w in weights)
