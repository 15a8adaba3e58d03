"""GGUF export, checked against llama.cpp itself (through llama-cpp-python, built from source).

The test models are small and trained a little on real text (so greedy decoding follows clear
preferences rather than near-ties of random weights); the tokenizer is trained here on the embedded
CPython docs plus Chinese text made up below.
"""

import random

import numpy as np
import pytest
import torch
from llama_cpp import Llama

from sakimi_next.cli import main
from sakimi_next.data import builtin_topics
from sakimi_next.generate import generate
from sakimi_next.export.gguf import DENSE_ARCH, MOE_ARCH, export_gguf, rope_sections
from sakimi_next.model import Qwen3NextForCausalLM
from sakimi_next.tokenizer import train_tokenizer
from sakimi_next.optim import build_optimizer
from sakimi_next.util import UserError

from .helpers import chinese_text as helpers_chinese_text
from .helpers import make_checkpoint, small_config, train_briefly

GGML_TYPE_F32 = 0
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64)

# Chinese of our own making: phrases combined into sentences by a seeded generator
ZH_SUBJECTS = ["小明", "老师", "我们", "这只小猫", "城市里的人", "程序员", "她的朋友"]
ZH_VERBS = ["喜欢", "正在学习", "每天都看", "想要写", "慢慢地读", "认真地检查"]
ZH_OBJECTS = ["中文小说", "数学题", "一封长信", "新的函数", "天气预报", "古老的诗歌", "计算机程序"]
ZH_ENDS = ["。", "，然后去公园散步。", "！", "，因为这很有意思。", "吗？"]


def chinese_text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(ZH_SUBJECTS) + rng.choice(ZH_VERBS) + rng.choice(ZH_OBJECTS) + rng.choice(ZH_ENDS)
                   for _ in range(n))


ENGLISH = builtin_topics()[0][:600]
TEXTS = {
    "english": ENGLISH,
    "chinese": chinese_text(12, seed=99),
    "emoji": "Smile 😀, family 👨‍👩‍👧‍👦, flags 🇯🇵🇫🇷, a wave 👋🏽, keycap 1️⃣ and ❤️ — done.",
    "control": "tab\there\x00nul\x01\x07bell\x1b[31mred\x1b[0m\x0bvt\x0cff\r\nCRLF\x1c\x1d\x1e\x1fsep\x7fdel"
               "\x85nel\u00a0nbsp\u2028ls\u3000ideo\ufeffbom",
    "whitespace": "  leading\n\n\n   trailing   \n\t\t x  y   \n \n",
    "digits_code": "In 2024, 3.14159 * 1e10 = 31415900000; def f(x): return [1, 2, 3]  # it's, we'll, I'D",
    "special": "<|im_start|>user\nHi there<|im_end|>\n<|endoftext|>tail<|pad|>",
    "mixed": ENGLISH[:120] + chinese_text(3, seed=5) + " 🎉\n",
}
PROMPTS = [ENGLISH[:80], chinese_text(2, seed=7), "The list of built-in functions:\n"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = builtin_topics() + [chinese_text(400, seed=s) for s in range(4)]
    tok = train_tokenizer(texts, 768)
    tok.save(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    return tok


def trained_on_text(config, tokenizer, steps: int = 30, seed: int = 0) -> Qwen3NextForCausalLM:
    """A model trained for `steps` AdamW steps on windows of the docs and the Chinese text. (So little
    training leaves its greedy continuations repetitive; `test_next_token_choices_on_text` compares
    the choices at every position of a real text as well.)"""
    torch.manual_seed(seed)
    model = Qwen3NextForCausalLM(config)
    ids = torch.tensor(tokenizer.encode("\n\n".join(builtin_topics()[:12]) + chinese_text(300, seed=1)))
    opt = build_optimizer(model, 3e-3, 0.1, (0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=g)
        x = torch.stack([ids[s:s + 65] for s in starts])
        model(x[:, :-1], x[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory):
    """kind -> (our model, {weight type: GGUF path}); the MoE model carries an MTP block."""
    out = {}
    for kind, extra in (("dense", {}), ("moe", {**MOE, "mtp_num_hidden_layers": 1})):
        config = small_config(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eot_id,
                              pad_token_id=tokenizer.pad_id, **extra)
        model = trained_on_text(config, tokenizer)
        d = tmp_path_factory.mktemp(kind)
        ck = make_checkpoint(d / "run", model, tokenizer)
        out[kind] = model, {wt: export_gguf(ck, d / f"{kind}-{wt}.gguf", wt).path for wt in ("f32", "f16", "q8_0")}
    return out


def llama(path, n_ctx: int = 512) -> Llama:
    # float32 KV cache and no flash attention: the f32 comparison is of the model, not of cache rounding
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=2, logits_all=True,
                 flash_attn=False, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)


def llama_logits(llm: Llama, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def llama_greedy(llm: Llama, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


# ------------------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("name", list(TEXTS))
def test_tokenization_matches(exported, tokenizer, name):
    llm = llama(exported["dense"][1]["f32"])
    text = TEXTS[name]
    ours = tokenizer.encode(text)
    assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ours
    assert llm.detokenize(ours, special=True) == text.encode("utf-8")


@pytest.fixture(scope="module")
def whole_characters_gguf(tmp_path_factory):
    """A tokenizer over whole characters (frequent characters are tokens before BPE learns merges), and an
    untrained small model exported with it (llama.cpp reads only its vocabulary)."""
    texts = builtin_topics()[:40] + [chinese_text(400, seed=s) for s in range(4)] + [helpers_chinese_text(20_000)]
    tok = train_tokenizer(texts, 1280, whole_characters=True)
    d = tmp_path_factory.mktemp("whole")
    tok.save(d / "tokenizer.json")
    model = Qwen3NextForCausalLM(small_config(vocab_size=tok.vocab_size, eos_token_id=tok.eot_id,
                                              pad_token_id=tok.pad_id))
    gguf = export_gguf(make_checkpoint(d / "run", model, tok), d / "whole.gguf", "f32").path
    return tok, Llama(model_path=str(gguf), vocab_only=True, verbose=False)


@pytest.mark.parametrize("name", [*TEXTS, "zipf_chinese", "rare_characters"])
def test_whole_characters_tokenization_matches(whole_characters_gguf, name):
    tok, llm = whole_characters_gguf
    text = {**TEXTS, "zipf_chinese": helpers_chinese_text(600),
            "rare_characters": "龘靐齉𠀀，貔貅🦜\U0010fffd and 字字字"}[name]
    ours = tok.encode(text)
    if name == "zipf_chinese":  # its characters are tokens: far fewer tokens than characters of three bytes
        assert len(ours) < len(text) * 0.8
    assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ours
    assert llm.detokenize(ours, special=True) == text.encode("utf-8")


def test_chat_template_and_turn_end_reach_llama_cpp(exported, tokenizer):
    """The ChatML template of tokenizer_config.json, and <|im_end|> as the end of a turn."""
    from sakimi_next.chat import render
    from sakimi_next.tokenizer import CHAT_TEMPLATE, IM_END

    llm = llama(exported["dense"][1]["f32"])
    assert llm.metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert int(llm.metadata["tokenizer.ggml.eot_token_id"]) == tokenizer.token_to_id(IM_END)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好, what is a list?"}]
    text = render(msgs, add_generation_prompt=True)
    assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == tokenizer.encode(text)


# ---------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_logits_match_f32(exported, tokenizer, kind):
    model, files = exported[kind]
    ids = tokenizer.encode(TEXTS["mixed"] + TEXTS["english"])[:200]
    theirs = llama_logits(llama(files["f32"]), ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    print(f"{kind} f32: max |logit difference| {np.abs(theirs - ours).max():.2e}")
    assert np.abs(theirs - ours).max() <= 1e-3


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_greedy_identical_f32(exported, tokenizer, kind):
    model, files = exported[kind]
    llm = llama(files["f32"])
    for text in PROMPTS:
        prompt = tokenizer.encode(text)
        assert llama_greedy(llm, prompt, 64) == generate(model, [prompt], 64)[0], text


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_greedy_agrees_q8_0(exported, tokenizer, kind):
    """At least 90% of the 3 x 64 greedy tokens are the same, position by position."""
    model, files = exported[kind]
    llm = llama(files["q8_0"])
    same = total = 0
    for text in PROMPTS:
        prompt = tokenizer.encode(text)
        theirs, ours = llama_greedy(llm, prompt, 64), generate(model, [prompt], 64)[0]
        same += sum(a == b for a, b in zip(theirs, ours))
        total += len(ours)
    print(f"{kind} q8_0: {same}/{total} greedy tokens agree")
    assert same / total >= 0.9, f"{same}/{total}"


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_next_token_choices_on_text(exported, tokenizer, kind):
    """The argmax at every position of a real text (English and Chinese): all equal in f32, >= 90% in q8_0."""
    model, files = exported[kind]
    ids = tokenizer.encode(TEXTS["english"] + TEXTS["chinese"])[:256]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy().argmax(-1)
    assert (llama_logits(llama(files["f32"]), ids).argmax(-1) == ours).all()
    agree = (llama_logits(llama(files["q8_0"]), ids).argmax(-1) == ours).mean()
    print(f"{kind} q8_0: {agree:.1%} of next-token choices agree, {len(set(ours.tolist()))} distinct")
    assert agree >= 0.9


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_f16_logits_close(exported, tokenizer, kind):
    model, files = exported[kind]
    ids = tokenizer.encode(TEXTS["english"])[:120]
    theirs = llama_logits(llama(files["f16"]), ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    print(f"{kind} f16: max |logit difference| {np.abs(theirs - ours).max():.2e}")
    assert np.abs(theirs - ours).max() <= 0.05
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.95


# ------------------------------------------------------------------------------------- the presets
@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny_5m", "tiny_10m", "tiny_10m_moe", "small_50m"])
def test_presets_run_in_llama_cpp(tokenizer, tmp_path, name):
    """Every preset's shapes (vocabulary padded past the tokenizer's) load and compute as ours."""
    from sakimi_next.config import preset

    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(preset(name, eos_token_id=tokenizer.eot_id, pad_token_id=tokenizer.pad_id))
    train_briefly(model, tokenizer.vocab_size, steps=2)
    ck = make_checkpoint(tmp_path / "run", model, tokenizer, preset_name=name)
    res = export_gguf(ck, tmp_path / "m.gguf", "f32")
    assert res.architecture == (MOE_ARCH if model.config.is_moe else DENSE_ARCH)
    llm = llama(res.path, n_ctx=256)
    ids = tokenizer.encode(TEXTS["mixed"])[:100]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(llama_logits(llm, ids) - ours).max() <= 1e-3
    assert llama_greedy(llm, ids[:20], 24) == generate(model, [ids[:20]], 24)[0]


def test_rope_sections_cover_every_rotated_pair():
    for rot in (2, 4, 16, 32, 64, 128):
        sections, pairs = rope_sections(small_config(head_dim=128, partial_rotary_factor=rot / 128)), rot // 2
        assert sum(sections) == pairs and sections[3] == 0
        assert all(p < 3 * sections[p % 3] for p in range(pairs))


# ------------------------------------------------------------------------ the command, and refusals
def test_command_writes_and_replaces_only_its_own_files(tokenizer, tmp_path, capsys):
    model = Qwen3NextForCausalLM(small_config(vocab_size=tokenizer.vocab_size, mtp_num_hidden_layers=1, **MOE))
    ck = make_checkpoint(tmp_path / "run", model, tokenizer)
    args = ["--mode", "export", "--format", "gguf", "--resume-from", str(ck), "--gguf-type", "q8_0"]
    assert main([*args, "--out-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "mtp" in out and "qwen3next" in out
    path = tmp_path / "out" / "model-q8_0.gguf"
    first = path.read_bytes()
    assert main([*args, "--out-file", str(path)]) == 0  # an earlier export of ours is replaced
    assert path.read_bytes() == first
    other = tmp_path / "notes.gguf"
    other.write_text("my notes")
    capsys.readouterr()
    assert main([*args, "--out-file", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a GGUF file exported by sakimi-next" in err
    assert other.read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.gguf", "out", "run"]  # no temporary left


@pytest.mark.parametrize("overrides, expect", [
    (dict(**MOE, mlp_only_layers=[1]), "layers [1] are dense and the others MoE"),
    (dict(**MOE, decoder_sparse_step=2), "layers [0, 2] are dense"),
    ({**MOE, "shared_expert_intermediate_size": 0}, "no shared expert"),
    (dict(**MOE, norm_topk_prob=False), "norm_topk_prob is false"),
    (dict(linear_value_head_dim=32), "linear_key_head_dim (16) != linear_value_head_dim (32)"),
    (dict(rms_norm_eps=1e-5), "rms_norm_eps is 1e-05"),
], ids=["mlp_only_layers", "sparse_step", "no_shared_expert", "no_norm_topk", "head_dims", "eps"])
def test_unrepresentable_models_are_refused(tokenizer, tmp_path, capsys, overrides, expect):
    model = Qwen3NextForCausalLM(small_config(vocab_size=tokenizer.vocab_size, **overrides))
    ck = make_checkpoint(tmp_path / "run", model, tokenizer)
    rc = main(["--mode", "export", "--format", "gguf", "--resume-from", str(ck),
               "--out-file", str(tmp_path / "m.gguf")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and expect in err, err
    assert not (tmp_path / "m.gguf").exists()


def test_foreign_tokenizer_is_refused(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    from sakimi_next.tokenizer import Tokenizer

    tk = HFTokenizer(models.BPE())
    tk.normalizer = normalizers.NFKC()
    tk.pre_tokenizer = pre_tokenizers.ByteLevel()
    tk.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    tok = Tokenizer(tk)
    tok.save(tmp_path / "tokenizer.json")
    ck = make_checkpoint(tmp_path / "run", Qwen3NextForCausalLM(small_config(vocab_size=300)), tok)
    with pytest.raises(UserError, match="normalizer"):
        export_gguf(ck, tmp_path / "m.gguf", "f32")
