"""The tokenizer: lossless round trips, determinism, transformers parity, loading errors; for both kinds,
byte-level BPE alone and over whole characters (`whole_characters`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sakimi_next.tokenizer import (EOT, IM_END, IM_START, MIN_CHAR_COUNT, PAD, Tokenizer, byte_level,
                                   character_counts, character_tokens, count_pieces, frequent_characters,
                                   train_tokenizer)
from sakimi_next.util import UserError, sha256_file

from .helpers import chinese_text, english_text

# A small mixed corpus: English prose and code from the CPython docs, Chinese, digits, emoji.
CHINESE = ("此开卷第一回也。作者自云：因曾历过一番梦幻之后，故将真事隐去，而借通灵之说，撰此石头记一书也。"
           "贾宝玉和林黛玉在大观园里读书，薛宝钗笑道：“你们又在这里说什么？”\n")


def corpus() -> list[str]:
    from pydoc_data.topics import topics

    english = [topics[k] for k in sorted(topics)[:30]]
    return english + [CHINESE * 3, "1234567890 3.14159 2024-01-01 🙂🚀 naïve café\r\nline two\r\n"] * 5


KINDS = {"bpe": False, "whole_characters": True}  # kind -> train_tokenizer's whole_characters


@pytest.fixture(scope="module", params=list(KINDS))
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def tok(kind) -> Tokenizer:
    return train_tokenizer(corpus(), 600, KINDS[kind])


SPECIAL_AND_TRICKY = st.sampled_from([EOT, PAD, IM_START, IM_END, "<|", "|>", "<|endoftext", "\r\n", "\n\n",
                                      " ", "\t", "\x00", "\u3000", "\u2028", "\ufeff", "🙂", "👩‍👩‍👧", "字",
                                      "'s", " 's", "１２３", "\U0010ffff"])
MIXED = st.lists(st.one_of(st.text(max_size=20), SPECIAL_AND_TRICKY,
                           st.text(alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), max_size=10)),
                 max_size=12).map("".join)


def test_special_tokens_come_first(tok):
    assert [tok.token_to_id(t) for t in (EOT, PAD, IM_START, IM_END)] == [0, 1, 2, 3]
    assert (tok.eot_id, tok.pad_id, tok.vocab_size) == (0, 1, 600)
    assert tok.encode(EOT + "a" + IM_END)[0] == 0 and tok.encode("x" + IM_END)[-1] == 3


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(st.text(), MIXED))
def test_round_trip_any_unicode(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", [
    "", " ", "\n", "\r\n", "\r", "a\r\nb\r\n\r\n", "  leading and trailing  ", "\t\ttabs\t", "\x00\x01\x1f\x7f",
    CHINESE, "混合 mixed 文本 text。", "emoji 🙂🚀👩‍👩‍👧 flags 🇨🇳🇬🇧", "<|endoftext|>literal<|pad|>",
    "Ｆｕｌｌ　ｗｉｄｔｈ",
])
def test_round_trip_examples(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_batch_equals_single(tok):
    texts = corpus()[:8] + ["", "x", CHINESE]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_digits_are_single_tokens(tok):
    # the pre-tokenizer splits numbers into digits, so no token spans two digits
    ids = tok.encode("2024 31415926")
    assert [tok.decode([i]) for i in ids] == ["2", "0", "2", "4", " ", "3", "1", "4", "1", "5", "9", "2", "6"]


def test_training_is_deterministic(tok, kind, tmp_path):
    again = train_tokenizer(corpus(), 600, KINDS[kind])
    assert again.sha256 == tok.sha256
    # and in a fresh interpreter with another hash seed
    code = ("import sys; sys.path.insert(0, '.'); from tests.test_tokenizer import corpus; "
            "from sakimi_next.tokenizer import train_tokenizer; "
            f"print(train_tokenizer(corpus(), 600, {KINDS[kind]}).sha256)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == tok.sha256


def test_save_load(tok, tmp_path):
    path = tmp_path / "sub" / "tokenizer.json"
    tok.save(path)
    assert tok.path == path and sha256_file(path) == tok.sha256
    loaded = Tokenizer.load(path)
    assert (loaded.sha256, loaded.vocab_size, loaded.eot_id, loaded.pad_id) == (tok.sha256, 600, 0, 1)
    assert loaded.encode(CHINESE) == tok.encode(CHINESE)
    assert not list(path.parent.glob("*.tmp"))
    json.loads(path.read_text())  # plain JSON, readable by anything


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(st.text(), MIXED))
def test_transformers_gives_the_same_ids(hf_tok, tok, text):
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


@pytest.fixture(scope="module")
def hf_tok(tok, tmp_path_factory):
    import transformers  # a test dependency (pyproject.toml, extra "test"): its absence is a failure, not a skip
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    for text in corpus()[:5] + [CHINESE, EOT + "x" + IM_START]:
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    return hf


def test_too_small_corpus_and_vocab(tmp_path):
    for whole_characters in (False, True):
        with pytest.raises(UserError, match=r"too small for a vocabulary of 5,000: BPE found only [\d,]+ tokens"):
            train_tokenizer(["tiny corpus, tiny corpus"], 5000, whole_characters)
        with pytest.raises(UserError, match="at least 260"):
            train_tokenizer(["abc"], 100, whole_characters)


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="tokenizer not found"):
        Tokenizer.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    for content in ("this is not json", '{"hello": 1}', ""):
        bad.write_text(content)
        with pytest.raises(UserError, match="is not a tokenizer.json") as e:
            Tokenizer.load(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="is not a tokenizer.json but a directory"):
        Tokenizer.load(tmp_path)


def test_foreign_tokenizer_without_eot(tmp_path):
    from tokenizers import Tokenizer as HF, models

    path = tmp_path / "t.json"
    path.write_text(HF(models.BPE()).to_str())
    with pytest.raises(UserError, match="has no <\\|endoftext\\|> token"):
        Tokenizer.load(path)


# ------------------------------------------------------------------------------------- whole characters
def zh_corpus() -> list[str]:
    """Generated Chinese (Zipf words over ~600 common characters), English, and one line of rare
    characters seen fewer than MIN_CHAR_COUNT times each."""
    return [chinese_text(20_000, seed=1), english_text(20_000), "罕见字：龘靐齉。🦜🦜\n", chinese_text(5_000, seed=2)]


@pytest.fixture(scope="module")
def zh_tok() -> Tokenizer:
    return train_tokenizer(zh_corpus(), 1500, whole_characters=True)


def test_byte_symbols_are_bytelevels():
    from tokenizers import pre_tokenizers

    text = "".join(map(chr, range(1, 0x800))) + "你好🙂\U0010ffff"
    byte_level_pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    assert byte_level_pre.pre_tokenize_str(text)[0][0] == byte_level(text.encode("utf-8"))
    assert sorted(byte_level(bytes(range(256)))) == sorted(pre_tokenizers.ByteLevel.alphabet())


def test_character_tokens_share_prefixes():
    # 你 e4 bd a0 and 住 e4 bd 8f share a prefix; 好 e5 a5 bd; é c3 a9; 😀 f0 9f 98 80
    assert character_tokens(["你", "住", "好", "é", "😀"]) == [
        b"\xe4\xbd", "你".encode(), "住".encode(), b"\xe5\xa5", "好".encode(), "é".encode(),
        b"\xf0\x9f", b"\xf0\x9f\x98", "😀".encode()]
    assert character_tokens(["你", "住", "好"], budget=4) == [b"\xe4\xbd", "你".encode(), "住".encode()]


def test_frequent_characters_cover_the_text_and_skip_the_rare():
    counts = {"a": 5000, "的": 3000, "了": 1000, "é": 500, "字": 40, "子": 10}
    # 99.5% of 9,550 characters: a to é make 9,500, 字 reaches it, 子 is left out; "a" is a byte, a token anyway
    assert frequent_characters(counts) == ["的", "了", "é", "字"]
    assert frequent_characters({"的": 100, "龘": MIN_CHAR_COUNT - 1}) == ["的"]  # 龘 is too rare
    assert frequent_characters({"a": 10**6, "的": 10}) == []  # "a" alone makes up 99.5%
    assert frequent_characters({"的": MIN_CHAR_COUNT - 1}) == []
    assert frequent_characters({}) == []


def test_frequent_characters_are_single_tokens_and_the_rest_fall_back_to_bytes(zh_tok):
    texts = zh_corpus()
    frequent = frequent_characters(character_counts(count_pieces(texts)))
    assert len(frequent) > 300
    assert all(len(zh_tok.encode(ch)) == 1 for ch in frequent)
    # the first merges spell out the frequent characters, most frequent first
    merges = json.loads(zh_tok._json)["model"]["merges"]
    spelled = [(byte_level(t[:-1]), byte_level(t[-1:])) for t in character_tokens(frequent)]
    assert [tuple(m) for m in merges[:len(spelled)]] == spelled
    assert len(merges) > len(spelled) + 100  # BPE learned merges on top: words of several characters
    assert any(len(zh_tok.decode([i])) > 1 and "\u4e00" <= zh_tok.decode([i])[0] <= "\u9fff"
               for i in range(300, zh_tok.vocab_size))
    # characters seen fewer than MIN_CHAR_COUNT times, or never, are bytes, and come back exactly
    for rare in ("龘", "靐", "齉", "🦜", "𠀀", "\U0010fffd"):
        ids = zh_tok.encode(rare)
        assert len(ids) > 1 and zh_tok.decode(ids) == rare


def test_text_without_frequent_many_byte_characters_gives_plain_bpe():
    # ASCII, and two characters of two bytes seen once (no token of their own)
    texts = [english_text(30_000).encode("ascii", "ignore").decode(), "1234 naïve café\r\nline two\n"]
    assert train_tokenizer(texts, 700, whole_characters=True).sha256 == train_tokenizer(texts, 700).sha256


def test_characters_take_a_small_vocabulary_first():
    # 300 - 260 = 40 merges: the most frequent characters that fit (39 merges here: the next one needs two),
    # then one learned merge
    tok = train_tokenizer(zh_corpus(), 300, whole_characters=True)
    frequent = frequent_characters(character_counts(count_pieces(zh_corpus())))
    fit = character_tokens(frequent, budget=40)
    merges = [tuple(m) for m in json.loads(tok._json)["model"]["merges"]]
    assert tok.vocab_size == 300 and len(merges) == 40 and len(fit) == 39
    assert merges[:39] == [(byte_level(t[:-1]), byte_level(t[-1:])) for t in fit]
    n = sum(1 for t in fit if len(t.decode("utf-8", "ignore")) == 1)  # the characters among the tokens
    assert all(len(tok.encode(ch)) == 1 for ch in frequent[:n]) and len(tok.encode(frequent[n])) > 1


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(st.text(), MIXED, st.text(alphabet=st.sampled_from(chinese_text(2_000)), max_size=40)))
def test_whole_characters_round_trip_and_transformers_agree(zh_tok, zh_hf, text):
    ids = zh_tok.encode(text)
    assert zh_tok.decode(ids) == text
    assert zh_hf(text, add_special_tokens=False)["input_ids"] == ids


@pytest.fixture(scope="module")
def zh_hf(zh_tok, tmp_path_factory):
    import transformers

    path = tmp_path_factory.mktemp("zh") / "tokenizer.json"
    zh_tok.save(path)
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
