"""The tokenizer: lossless round trips, determinism, transformers parity, loading errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sakimi_next.tokenizer import EOT, IM_END, IM_START, PAD, Tokenizer, train_tokenizer
from sakimi_next.util import UserError, sha256_file

# A small mixed corpus: English prose and code from the CPython docs, Chinese, digits, emoji.
CHINESE = ("此开卷第一回也。作者自云：因曾历过一番梦幻之后，故将真事隐去，而借通灵之说，撰此石头记一书也。"
           "贾宝玉和林黛玉在大观园里读书，薛宝钗笑道：“你们又在这里说什么？”\n")


def corpus() -> list[str]:
    from pydoc_data.topics import topics

    english = [topics[k] for k in sorted(topics)[:30]]
    return english + [CHINESE * 3, "1234567890 3.14159 2024-01-01 🙂🚀 naïve café\r\nline two\r\n"] * 5


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(corpus(), 600)


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


def test_training_is_deterministic(tok, tmp_path):
    again = train_tokenizer(corpus(), 600)
    assert again.sha256 == tok.sha256
    # and in a fresh interpreter with another hash seed
    code = ("import sys; sys.path.insert(0, '.'); from tests.test_tokenizer import corpus; "
            "from sakimi_next.tokenizer import train_tokenizer; print(train_tokenizer(corpus(), 600).sha256)")
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
    with pytest.raises(UserError, match=r"too small for a vocabulary of 5,000: BPE found only [\d,]+ tokens"):
        train_tokenizer(["tiny corpus, tiny corpus"], 5000)
    with pytest.raises(UserError, match="at least 260"):
        train_tokenizer(["abc"], 100)


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
