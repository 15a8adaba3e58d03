"""Export to and import from the transformers format."""

import json
import warnings

import pytest
import torch

from sakimi_next.pretrained import load_for_inference
from sakimi_next.cli import main
from sakimi_next.config import preset
from sakimi_next.generate import generate
from sakimi_next.export.card import ARCHITECTURES
from sakimi_next.export.hf import export_hf, save_tensors_sharded
from sakimi_next.huggingface import from_hf_tensors, load_hf_config, load_hf_tensors, to_hf_tensors
from sakimi_next.model import Qwen3NextForCausalLM
from sakimi_next.tokenizer import train_tokenizer

from .helpers import chinese_text, make_checkpoint, mixed_corpus, small_config, train_briefly

ENGLISH = "Once upon a time, a little girl named Lily found a shiny red ball in the park.\n"
CHINESE = "却说贾母正在房中与众人说笑，忽见宝玉进来，便问：“你往哪里去了？”\n"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = train_tokenizer([mixed_corpus()], 1024)
    tok.save(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    return tok


def exported(tmp_path, model, tokenizer, name="custom", layout=None):
    ck = make_checkpoint(tmp_path / "run", model, tokenizer, preset_name=name)
    return export_hf(ck, tmp_path / "exported", layout=layout)


# every dense preset in its default layout (Qwen3.5), and one in the other (test_qwen35.py has the MoE preset)
@pytest.mark.parametrize("name,layout", [("tiny_5m", "qwen3_5"), ("tiny_10m", "qwen3_5"),
                                         pytest.param("small_50m", "qwen3_5", marks=pytest.mark.slow),
                                         ("tiny_10m", "qwen3_next")])
def test_export_loads_in_transformers(tmp_path, tokenizer, name, layout):
    """AutoModelForCausalLM loads the export with no missing, unexpected or mismatched key and gives our
    logits (float32, 1e-5) and our greedy text; AutoTokenizer encodes as we do; importing the export gives
    back every tensor byte for byte and the same config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    config = preset(name, eos_token_id=tokenizer.eot_id, pad_token_id=tokenizer.pad_id)
    model = Qwen3NextForCausalLM(config)
    train_briefly(model, tokenizer.vocab_size, steps=2)
    out = exported(tmp_path, model, tokenizer, name, layout if layout != "qwen3_5" else None)
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "README.md"):
        assert (out / f).is_file(), f
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == [ARCHITECTURES[layout]]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(hf).__name__ == ARCHITECTURES[layout]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    x = torch.tensor([tokenizer.encode(ENGLISH + CHINESE)])
    with torch.no_grad():
        assert (hf(x).logits - model(x).logits).abs().max().item() <= 1e-5

    prompt = tokenizer.encode("Once upon a time")
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=50, do_sample=False,
                             pad_token_id=tokenizer.pad_id)[0, len(prompt):].tolist()
    assert theirs == generate(model, [prompt], 50)[0]

    auto = AutoTokenizer.from_pretrained(out)
    for text in (ENGLISH, CHINESE, ENGLISH + CHINESE):
        assert auto(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
        assert auto.decode(tokenizer.encode(text)) == text
    assert auto.eos_token_id == tokenizer.eot_id and auto.pad_token_id == tokenizer.pad_id

    back = load_hf_tensors(out)  # the round trip: byte-identical
    ours = model.state_dict()
    assert set(back) == set(ours) and all(back[k].dtype == v.dtype and torch.equal(back[k], v)
                                          for k, v in ours.items())
    assert load_hf_config(out) == model.config


def test_whole_characters_tokenizer_loads_in_transformers(tmp_path):
    """A tokenizer over whole characters (frequent characters are tokens before BPE learns merges) exports
    like any other: AutoTokenizer gives our ids, English and Chinese, seen characters and unseen."""
    from transformers import AutoTokenizer

    tok = train_tokenizer([mixed_corpus()], 1536, whole_characters=True)
    tok.save(tmp_path / "tokenizer.json")
    model = Qwen3NextForCausalLM(small_config(vocab_size=tok.vocab_size, eos_token_id=tok.eot_id,
                                              pad_token_id=tok.pad_id))
    auto = AutoTokenizer.from_pretrained(exported(tmp_path, model, tok))
    zipf = chinese_text(3_000)
    assert len(tok.encode(zipf)) < 0.6 * len(zipf)  # its characters are tokens, and many of its words
    for text in (ENGLISH, CHINESE, ENGLISH + CHINESE, zipf, "龘靐齉 🦜 <|im_end|>"):
        assert auto(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
        assert auto.decode(tok.encode(text)) == text


def test_round_trip_is_byte_identical(tmp_path, tokenizer):
    torch.manual_seed(1)
    model = Qwen3NextForCausalLM(small_config(tie_word_embeddings=False, vocab_size=1024))
    train_briefly(model, 1024)
    out = exported(tmp_path, model, tokenizer)
    back = load_hf_tensors(out)
    ours = model.state_dict()
    assert set(back) == set(ours)
    for k, v in ours.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert load_hf_config(out) == model.config


def test_generate_and_eval_from_exported_directory(tmp_path, tokenizer, capsys):
    torch.manual_seed(2)
    model = Qwen3NextForCausalLM(small_config(vocab_size=1024, eos_token_id=0, pad_token_id=1))
    out = exported(tmp_path, model, tokenizer)
    loaded, tok, info = load_for_inference(out, "cpu")
    assert info["kind"] == "huggingface" and tok.sha256 == tokenizer.sha256
    prompt = tokenizer.encode("Lily")
    assert generate(loaded, [prompt], 8) == generate(model, [prompt], 8)
    assert main(["--mode", "generate", "--resume-from", str(out), "--prompt", "Lily", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("Lily")


def test_import_transformers_save_pretrained(tmp_path):
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM as HF

    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = Qwen3NextConfig(vocab_size=300, hidden_size=64, num_hidden_layers=4, intermediate_size=96,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=32, linear_num_key_heads=2,
                              linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                              num_experts=0, tie_word_embeddings=False, max_position_embeddings=512)
        hf = HF(cfg).eval()
        with torch.no_grad():
            for p in hf.parameters():
                if p.ndim == 1:
                    p.add_(torch.randn_like(p) * 0.1)
        hf.save_pretrained(tmp_path / "hf")
    config = load_hf_config(tmp_path / "hf")
    model = Qwen3NextForCausalLM(config).eval()
    from sakimi_next.checkpoint import load_weights

    load_weights(model, load_hf_tensors(tmp_path / "hf"), tmp_path / "hf")
    x = torch.randint(0, 300, (2, 70))
    with torch.no_grad():
        assert (model(x).logits - hf(x).logits).abs().max().item() <= 1e-4


def test_sharded_export_and_expert_names(tmp_path):
    torch.manual_seed(4)
    config = small_config(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                          shared_expert_intermediate_size=48)
    model = Qwen3NextForCausalLM(config)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    disk = to_hf_tensors(tensors)
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in disk
    assert "model.layers.0.mlp.experts.gate_up_proj" not in disk
    files = save_tensors_sharded(disk, tmp_path, shard_bytes=100_000)
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    back = load_hf_tensors(tmp_path)
    assert set(back) == set(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())
    assert set(from_hf_tensors(disk)) == set(tensors)


def write_hf_dir(path, config_dict, tensors=None):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_dict))
    if tensors is not None:
        save_file(tensors, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("case", ["other_model_type", "missing_weights", "shape_mismatch", "pickle_only"])
def test_bad_directories(tmp_path, case, capsys, tokenizer):
    model = Qwen3NextForCausalLM(small_config())
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    hf = model.config.to_hf_dict()
    if case == "other_model_type":
        d = write_hf_dir(tmp_path / "m", {**hf, "model_type": "llama"}, sd)
        expect = "holds a 'llama' model, not qwen3_next or qwen3_5_text"
    elif case == "missing_weights":
        d = write_hf_dir(tmp_path / "m", hf, {k: v for k, v in sd.items() if "layers.2." not in k})
        expect = "lacks weights for"
    elif case == "shape_mismatch":
        sd["model.norm.weight"] = torch.zeros(7)
        d = write_hf_dir(tmp_path / "m", hf, sd)
        expect = "model.norm.weight has shape (7,), the model expects (64,)"
    else:
        d = write_hf_dir(tmp_path / "m", hf)
        (d / "pytorch_model.bin").write_bytes(b"not read")
        expect = "only safetensors are read"
    tokenizer.save(d / "tokenizer.json")
    rc = main(["--mode", "eval", "--resume-from", str(d), "--text-file", __file__])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and expect in err, err


def test_fine_tune_from_exported_directory(tmp_path, tokenizer, capsys):
    """--init-from an exported model: training starts from its weights (the first loss is the model's own
    loss on that batch), and data made with another tokenizer is refused."""
    from sakimi_next.data import prepare_data
    from sakimi_next.batches import WindowSampler

    torch.manual_seed(5)
    model = Qwen3NextForCausalLM(small_config(vocab_size=1024, eos_token_id=tokenizer.eot_id,
                                              pad_token_id=tokenizer.pad_id))
    train_briefly(model, 1024, steps=5)
    out = exported(tmp_path, model, tokenizer)
    corpus = tmp_path / "c.txt"
    corpus.write_text(mixed_corpus()[:60_000], encoding="utf-8")
    data = prepare_data([str(corpus)], None, tmp_path / "data", tokenizer_path=out / "tokenizer.json",
                        vocab_size=1024)
    args = ["--mode", "train", "--init-from", str(out), "--data-dir", str(data), "--out-dir", str(tmp_path / "ft"),
            "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-every", "2", "--save-every", "2"]
    assert main(args) == 0
    first = json.loads((tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()[0])
    from sakimi_next.data import open_split

    x, y = WindowSampler(open_split(data, "train"), 32, 2, 0, 0, 1).batch(0, 0)
    with torch.no_grad():
        expected = model(x, y).loss.item()
    assert abs(first["loss"] - expected) < 1e-4
    # data tokenized with another tokenizer than the model's
    other = prepare_data([str(corpus)], None, tmp_path / "other", vocab_size=600, allow_vocab_mismatch=True)
    capsys.readouterr()
    rc = main([*args[:4], "--data-dir", str(other), *args[6:]])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "tokenized with another tokenizer" in err


def test_export_with_mtp_block(tmp_path, tokenizer):
    """MTP weights travel with the export under their released names; transformers ignores them."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(6)
    model = Qwen3NextForCausalLM(small_config(vocab_size=1024, mtp_num_hidden_layers=1))
    train_briefly(model, 1024)
    out = exported(tmp_path, model, tokenizer)
    assert json.loads((out / "config.json").read_text())["mtp_num_hidden_layers"] == 1
    back = load_hf_tensors(out)
    assert any(k.startswith("mtp.") for k in back)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]
    x = torch.randint(0, 1024, (1, 40))
    with torch.no_grad():
        assert (hf.eval()(x).logits - model(x).logits).abs().max().item() <= 1e-4
    assert "mtp" in (out / "README.md").read_text()
