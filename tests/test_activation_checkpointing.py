"""--activation-checkpointing: each decoder layer recomputed in the backward pass gives the gradients of
the plain forward (dropout masks, MoE router statistics, MTP, packed documents and lead-in included),
keeps fewer tensors, trains to the same losses, and can be switched on or off when resuming."""

import json
import os
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch

from sakimi_next import checkpoint as ckpt
from sakimi_next.batches import window_loss
from sakimi_next.model import DecoderLayer, Qwen3NextForCausalLM

from .helpers import ROOT, small_config, torchrun
from .test_train import TRAIN, losses, train
from .test_train import data_dir  # noqa: F401 (the module's prepared data, a fixture)

MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
           router_aux_loss_coef=0.01)
CONFIGS = {
    "dense": dict(),
    "moe": MOE,
    "mtp": dict(mtp_num_hidden_layers=1),
    "moe-mtp-attention-dropout": dict(MOE, mtp_num_hidden_layers=1, attention_dropout=0.1),
}


def step(config, checkpointing: bool, doc_starts: bool = False, lead_in: int = 0):
    """One training forward and backward (dropout 0.1, MTP weight 0.3 when there is a block) of a seeded
    model on seeded tokens -> (output, {name: gradient})."""
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(config)
    model.set_dropout(0.1)
    model.set_activation_checkpointing(checkpointing)
    model.train()
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, config.vocab_size, (2, 70), generator=g) for _ in range(2))
    lead = torch.randint(0, config.vocab_size, (2, lead_in), generator=g) if lead_in else None
    eot = int(x[0, 10]) if doc_starts else None  # some token of the batch ends a document
    torch.manual_seed(5)  # the dropout masks
    out = window_loss(model, model, x, y, lead, 0.3 if config.mtp_num_hidden_layers else 0.0, nullcontext(), eot)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert out_a.loss.item() == out_b.loss.item()
    for name in ("aux_loss", "mtp_loss"):  # router statistics counted once, as without recomputation
        va, vb = getattr(out_a, name), getattr(out_b, name)
        assert (va is None) == (vb is None) and (va is None or va.item() == vb.item()), name
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-8, msg=name)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_gradients(name):
    """Float32, dropout on the embedding and every residual branch (and in attention): the recomputation
    draws the same masks (non-reentrant checkpoint restores the RNG state), so the gradients are those
    of the plain forward."""
    config = small_config(**CONFIGS[name])
    assert_same(step(config, False), step(config, True))


@pytest.mark.parametrize("how", ["document-masking", "lead-in"])
def test_same_gradients_with_packed_documents_and_lead_in(how):
    """Packed documents (doc_starts) and a lead-in's cache: the recomputation starts from the same
    DeltaNet state and reads the same keys and values."""
    config = small_config(**CONFIGS["moe-mtp-attention-dropout"])
    kw = dict(doc_starts=True) if how == "document-masking" else dict(lead_in=24)
    assert_same(step(config, False, **kw), step(config, True, **kw))


def test_layers_recomputed_and_fewer_tensors_kept(monkeypatch):
    """Each layer runs twice (forward, then in the backward) and the forward keeps a fraction of the
    tensors the plain forward keeps for the backward."""
    config = small_config(**CONFIGS["moe-mtp-attention-dropout"])
    runs, plain_layer = [], DecoderLayer._layer
    monkeypatch.setattr(DecoderLayer, "_layer", lambda self, *a, **k: runs.append(1) or plain_layer(self, *a, **k))
    kept, counts, saved = {}, {}, []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    for on in (False, True):
        torch.manual_seed(0)
        model = Qwen3NextForCausalLM(config)
        model.set_activation_checkpointing(on)
        x = torch.randint(0, config.vocab_size, (2, 64))
        saved[:], runs[:] = [], []
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # sees what checkpointing keeps
            out = model(x, targets=x, mtp_weight=0.3)
        forward_runs = len(runs)
        out.loss.backward()
        kept[on], counts[on] = sum(saved), (forward_runs, len(runs))
    layers = config.num_hidden_layers + 1  # and the MTP block's
    assert counts[False] == (layers, layers) and counts[True] == (layers, 2 * layers)
    assert kept[True] < kept[False] / 3, kept


def test_inference_unchanged():
    """Evaluation mode, no_grad and decoding never recompute: the same logits with the setting on."""
    config = small_config(**CONFIGS["moe"])
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(config).eval()
    x = torch.randint(0, config.vocab_size, (2, 40))
    before = model(x).logits
    model.set_activation_checkpointing(True)
    assert torch.equal(model(x).logits, before)
    model.train()
    with torch.no_grad():
        cache = model.new_cache(2)
        assert torch.equal(model(x, cache=cache).logits, model.eval()(x).logits)


COMMON = ["--steps", "4", "--eval-every", "4", "--save-every", "2", "--dropout", "0.1", "--mtp-weight", "0.3"]


def test_training_same_losses_and_resume_across_the_flag(data_dir, tmp_path):  # noqa: F811
    """A short run with it follows the run without (dropout and MTP on); it is recorded in the run's
    settings, a resume keeps it unless told, and a resume may switch it off (or on) and still continue
    as the uninterrupted run."""
    assert train(data_dir, tmp_path / "plain", *COMMON) == 0
    assert train(data_dir, tmp_path / "ac", *COMMON, "--activation-checkpointing") == 0
    plain, ac = losses(tmp_path / "plain"), losses(tmp_path / "ac")
    assert plain.keys() == ac.keys() == {1, 2, 3, 4}
    for s in plain:
        assert abs(plain[s] - ac[s]) <= 1e-6, (s, plain[s], ac[s])
    state = json.loads((tmp_path / "ac" / "step_000002" / ckpt.STATE_FILE).read_text())
    assert state["args"]["activation_checkpointing"] is True
    for flag, recorded in ((), True), (("--no-activation-checkpointing",), False):
        out = tmp_path / f"resumed{len(flag)}"
        assert train(data_dir, out, *COMMON, "--resume-from", str(tmp_path / "ac" / "step_000002"), *flag) == 0
        resumed = losses(out)
        assert resumed.keys() == {3, 4} and all(abs(resumed[s] - plain[s]) <= 1e-6 for s in resumed)
        state = json.loads((ckpt.find_latest(out) / ckpt.STATE_FILE).read_text())
        assert state["args"]["activation_checkpointing"] is recorded
    out = tmp_path / "switched_on"
    assert train(data_dir, out, *COMMON, "--resume-from", str(tmp_path / "plain" / "step_000002"),
                 "--activation-checkpointing") == 0
    assert all(abs(v - plain[s]) <= 1e-6 for s, v in losses(out).items())


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_with_it_equal_one_without(data_dir, tmp_path, strategy):  # noqa: F811
    """Under torchrun (gloo), DDP and FSDP2 (each decoder layer sharded, the checkpoint inside it) with
    --activation-checkpointing follow one process without it."""
    common = [*TRAIN, "--data-dir", str(data_dir), "--steps", "3", "--eval-every", "3", "--save-every", "3",
              "--mtp-weight", "0.3"]
    from sakimi_next.cli import main

    assert main([*common, "--out-dir", str(tmp_path / "one"), "--batch-size", "4"]) == 0
    extra = ["--fsdp"] if strategy == "fsdp" else []
    torchrun(*common, "--out-dir", str(tmp_path / "two"), "--batch-size", "2", "--activation-checkpointing", *extra)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys()
    for s in one:
        assert abs(one[s] - two[s]) <= 1e-4 * abs(one[s]), (s, one[s], two[s])


@pytest.mark.slow
def test_compiled_with_it_equals_eager(data_dir, tmp_path):  # noqa: F811
    """--compile with --activation-checkpointing: torch.compile traces the checkpoint of each (dense) layer
    into its graph, and the run follows the eager one."""
    import shutil

    if not shutil.which("c++") and not shutil.which("g++"):
        pytest.skip("torch.compile on the CPU needs a C++ compiler")
    common = ["--steps", "3", "--eval-every", "3", "--save-every", "3", "--mtp-weight", "0.3"]
    assert train(data_dir, tmp_path / "eager", *common) == 0
    from torch._dynamo.utils import counters

    counters.clear()
    assert train(data_dir, tmp_path / "compiled", *common, "--compile", "--activation-checkpointing") == 0
    assert counters["stats"]["unique_graphs"] >= 2 and not counters["graph_break"]
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert eager.keys() == compiled.keys()
    for s in eager:
        assert compiled[s] == pytest.approx(eager[s], rel=1e-4)


def test_memory_script(tmp_path):
    """scripts/activation_memory.py runs both settings, each in its own process, and reports them."""
    out = tmp_path / "memory.json"
    r = subprocess.run([sys.executable, "scripts/activation_memory.py", "--preset", "tiny_5m", "--seq-len", "32",
                        "--steps", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert [x["checkpointing"] for x in results] == [False, True]
    assert all(x["peak_rss_mb"] >= x["rss_before_mb"] > 0 and x["step_s"] > 0 for x in results)
    assert "checkpointing" in r.stdout and "peak RSS MB" in r.stdout
