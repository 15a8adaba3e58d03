"""The two Hugging Face layouts: Qwen3.5 (`Qwen3_5ForCausalLM`, qwen3_5_text, the default for dense models)
and Qwen3-Next (`Qwen3NextForCausalLM`, the default with experts). Dense presets in both layouts are in
test_interop.py (AutoModelForCausalLM, greedy text, round trip); here the MoE preset, transformers' own
Qwen3.5 files read back, what the serving engines need in the files, and the refusals."""

import json
import warnings

import pytest
import torch
from safetensors import safe_open

from sakimi_next.checkpoint import load_weights
from sakimi_next.cli import main
from sakimi_next.config import PRESETS, Config, mrope_sections, preset
from sakimi_next.export.hf import export_hf
from sakimi_next.generate import generate
from sakimi_next.huggingface import (hf_layout, join_deltanet_projections, load_hf_config, load_hf_tensors,
                                     split_deltanet_projections)
from sakimi_next.model import Qwen3NextForCausalLM
from sakimi_next.pretrained import load_for_inference, read_model
from sakimi_next.tokenizer import train_tokenizer
from sakimi_next.util import UserError

from .helpers import english_text, make_checkpoint, small_config, train_briefly

DENSE = [name for name, p in PRESETS.items() if not p.model.get("num_experts")]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = train_tokenizer([english_text(40_000)], 512)
    tok.save(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    return tok


def quiet_auto_model(path):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return hf.eval()


def same_tensors(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", DENSE)
def test_qwen3_5_config_of_every_dense_preset(name):
    """What transformers and vLLM read: Qwen3_5TextConfig's fields, no MoE field, multi-section RoPE whose
    sections sum to half the rotary dimension (vLLM asserts it), the interval beside layer_types."""
    from transformers import Qwen3_5TextConfig

    config = preset(name)
    d = config.to_hf_dict("qwen3_5")
    assert d["model_type"] == "qwen3_5_text" and d["architectures"] == ["Qwen3_5ForCausalLM"]
    assert not {"num_experts", "mlp_only_layers", "decoder_sparse_step", "output_router_logits"} & set(d)
    rope = d["rope_parameters"]
    assert sum(rope["mrope_section"]) == config.rotary_dim // 2 and rope["mrope_interleaved"] is True
    assert d["full_attention_interval"] == 4 and d["tie_word_embeddings"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = Qwen3_5TextConfig(**d)
    assert hf.layer_types == config.layer_types and hf.rope_parameters["partial_rotary_factor"] == 0.25
    assert Config.from_hf_dict(d) == config and Config.from_hf_dict(hf.to_dict()) == config


def test_mrope_sections_interleave_every_rotated_pair():
    assert mrope_sections(16) == [3, 3, 2] and mrope_sections(32) == [6, 5, 5] and mrope_sections(64) == [11, 11, 10]


def test_projection_split_is_qwen3_5s_order():
    """The split moves rows only, into [all q | all k | all v] and z, b, a with value heads in order (value
    head j under key head j // r), and joins back exactly; checked on the rows' own indices."""
    config = small_config(linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=3,
                          linear_value_head_dim=2)
    Hk, dk, r, dv = 2, 3, 3, 2
    qkvz = torch.arange(Hk * (2 * dk + 2 * r * dv), dtype=torch.float32)[:, None].repeat(1, 5)
    ba = torch.arange(Hk * 2 * r, dtype=torch.float32)[:, None].repeat(1, 5)
    ours = {"model.layers.0.linear_attn.in_proj_qkvz.weight": qkvz, "model.layers.0.linear_attn.in_proj_ba.weight": ba}
    split = split_deltanet_projections(ours, config)
    block = 2 * dk + 2 * r * dv
    rows = lambda start, width: [h * block + start + i for h in range(Hk) for i in range(width)]  # noqa: E731
    qkv = split["model.layers.0.linear_attn.in_proj_qkv.weight"][:, 0].tolist()
    assert qkv == rows(0, dk) + rows(dk, dk) + rows(2 * dk, r * dv)
    assert split["model.layers.0.linear_attn.in_proj_z.weight"][:, 0].tolist() == rows(2 * dk + r * dv, r * dv)
    assert split["model.layers.0.linear_attn.in_proj_b.weight"][:, 0].tolist() == [0, 1, 2, 6, 7, 8]
    assert split["model.layers.0.linear_attn.in_proj_a.weight"][:, 0].tolist() == [3, 4, 5, 9, 10, 11]
    assert same_tensors(join_deltanet_projections(split, config), ours)


def test_transformers_qwen3_5_save_pretrained_is_read(tmp_path):
    """A Qwen3_5ForCausalLM saved by transformers itself (untied, its own names) loads into our model
    with the same logits: the conversion is transformers' layout, not only the inverse of ours."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = Qwen3_5TextConfig(vocab_size=300, hidden_size=64, num_hidden_layers=4, intermediate_size=96,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=32, linear_num_key_heads=2,
                                linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                                max_position_embeddings=512, tie_word_embeddings=False)
        hf = Qwen3_5ForCausalLM(cfg).eval()
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        hf.save_pretrained(tmp_path / "hf")
    assert hf_layout(tmp_path / "hf") == "qwen3_5"
    model = Qwen3NextForCausalLM(load_hf_config(tmp_path / "hf")).eval()
    load_weights(model, load_hf_tensors(tmp_path / "hf"), tmp_path / "hf")
    x = torch.randint(0, 300, (2, 70))
    with torch.no_grad():
        assert (model(x).logits - hf(x).logits).abs().max().item() <= 1e-5


@pytest.fixture(scope="module")
def moe_export(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("moe")
    torch.manual_seed(8)
    model = Qwen3NextForCausalLM(preset("tiny_10m_moe", vocab_size=tokenizer.vocab_size,
                                        eos_token_id=tokenizer.eot_id, pad_token_id=tokenizer.pad_id))
    train_briefly(model, tokenizer.vocab_size, steps=2)
    ck = make_checkpoint(root / "run", model, tokenizer, preset_name="tiny_10m_moe")
    return model, ck, export_hf(ck, root / "hf")


def test_moe_preset_exports_as_qwen3_next(moe_export, tokenizer):
    """tiny_10m_moe (tied) goes out as Qwen3-Next with its LM head stored (vLLM's and SGLang's loaders read
    it from the file); transformers loads it with our logits and greedy text; the import is exact."""
    model, _, out = moe_export
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3NextForCausalLM"] and config["tie_word_embeddings"] is True
    with safe_open(out / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("lm_head.weight"), model.model.embed_tokens.weight)
        assert "model.layers.0.linear_attn.in_proj_qkvz.weight" in f.keys()
    hf = quiet_auto_model(out)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # tied again
    x = torch.tensor([tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)])
    with torch.no_grad():
        assert (hf(x).logits - model(x).logits).abs().max().item() <= 1e-5
        prompt = x[:, :6]
        hf.generation_config.eos_token_id = None
        theirs = hf.generate(prompt, max_new_tokens=30, do_sample=False, pad_token_id=tokenizer.pad_id)
    assert theirs[0, 6:].tolist() == generate(model, [prompt[0].tolist()], 30)[0]
    assert same_tensors(load_hf_tensors(out), model.state_dict())
    assert load_hf_config(out) == model.config


def test_qwen3_5_layout_is_refused_for_experts(moe_export, tmp_path, capsys):
    _, ck, _ = moe_export
    rc = main(["--mode", "export", "--resume-from", str(ck), "--out-dir", str(tmp_path / "x"),
               "--hf-layout", "qwen3_5"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--hf-layout qwen3_5 is for dense models" in err, err
    assert not (tmp_path / "x").exists()


def test_both_layouts_load_for_every_use(tmp_path, tokenizer, capsys):
    """The command writes either layout; generate, eval, --init-from and GGUF read both, and what they read
    is the checkpoint itself."""
    torch.manual_seed(9)
    model = Qwen3NextForCausalLM(small_config(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eot_id,
                                              pad_token_id=tokenizer.pad_id))
    train_briefly(model, tokenizer.vocab_size)
    ck = make_checkpoint(tmp_path / "run", model, tokenizer)
    prompt = tokenizer.encode("The function")
    for layout in ("qwen3_5", "qwen3_next"):
        out = tmp_path / layout / "model"  # the GGUF file is named after the directory
        assert main(["--mode", "export", "--resume-from", str(ck), "--out-dir", str(out), "--hf-layout", layout]) == 0
        assert hf_layout(out) == layout and f"({'Qwen3_5' if layout == 'qwen3_5' else 'Qwen3Next'}ForCausalLM)" \
            in capsys.readouterr().out
        files = read_model(out)
        assert same_tensors(files.tensors, model.state_dict()) and files.config == model.config
        loaded, tok, _ = load_for_inference(out, "cpu")
        assert generate(loaded, [prompt], 10) == generate(model, [prompt], 10)
        gguf = tmp_path / layout / "model.gguf"
        assert main(["--mode", "export", "--format", "gguf", "--resume-from", str(out), "--out-file", str(gguf),
                     "--gguf-type", "f32"]) == 0
    from gguf import GGUFReader

    a, b = (GGUFReader(tmp_path / layout / "model.gguf") for layout in ("qwen3_5", "qwen3_next"))
    fields = lambda r: {f.name: f.contents() for f in r.fields.values() if f.name != "sakimi_next.exported_from"}  # noqa: E731
    assert fields(a) == fields(b)
    tensors = {t.name: t.data for t in b.tensors}
    assert len(a.tensors) == len(tensors) and all((t.data == tensors[t.name]).all() for t in a.tensors)


def test_qwen3_5_directory_with_a_missing_projection(tmp_path, tokenizer, capsys):
    from safetensors.torch import load_file, save_file

    model = Qwen3NextForCausalLM(small_config(vocab_size=tokenizer.vocab_size))
    out = export_hf(make_checkpoint(tmp_path / "run", model, tokenizer), tmp_path / "hf")
    weights = load_file(out / "model.safetensors")
    del weights["model.layers.1.linear_attn.in_proj_z.weight"]
    d = tmp_path / "broken"
    d.mkdir()
    save_file(weights, str(d / "model.safetensors"))
    for f in ("config.json", "tokenizer.json"):
        (d / f).write_bytes((out / f).read_bytes())
    rc = main(["--mode", "generate", "--resume-from", str(d), "--prompt", "x", "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "in_proj_z.weight is missing" in err, err
    with pytest.raises(UserError, match="only the dense text model"):
        (d / "config.json").write_text(json.dumps({"model_type": "qwen3_5", "text_config": {}}))
        load_hf_config(d)


def test_layout_flag_is_for_hf_only(tmp_path, capsys):
    rc = main(["--mode", "export", "--resume-from", str(tmp_path), "--format", "gguf", "--out-file",
               str(tmp_path / "m.gguf"), "--hf-layout", "qwen3_5"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--hf-layout is for --format hf" in err, err
