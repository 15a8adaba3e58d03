"""The chat format, chat fine-tuning data and training, and `generate --chat` (issue 14)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from sakimi_next import chat
from sakimi_next.cli import main
from sakimi_next.data import _builtin_topics
from sakimi_next.model import Qwen3NextForCausalLM
from sakimi_next.tokenizer import train_tokenizer

from .helpers import ROOT, make_checkpoint, small_config, train_briefly

CHINESE = "".join(f"第{i}回 贾宝玉和林黛玉在大观园里读书，薛宝钗笑道：“你们又在这里说什么？”王熙凤说了{i}句话。\n"
                  for i in range(40))
CONVERSATIONS = [
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What does the print() function do?"},
     {"role": "assistant", "content": "It writes its arguments to standard output."},
     {"role": "user", "content": "And len()?"},
     {"role": "assistant", "content": "It returns the number of items in a container."}],
    [{"role": "system", "content": "你是一个乐于助人的助手。"},
     {"role": "user", "content": "请介绍一下贾宝玉。"},
     {"role": "assistant", "content": "贾宝玉是《红楼梦》的主人公，住在大观园里。"}],
    [{"role": "user", "content": "Translate into Chinese: Lin Daiyu is reading."},
     {"role": "assistant", "content": "林黛玉在读书。"},
     {"role": "user", "content": "  leading spaces,\n\nblank lines, and a tab\t"},
     {"role": "assistant", "content": "\n\nA reply that starts with blank lines 🤖."}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A tokenizer trained here on the embedded CPython docs and generated Chinese."""
    t = train_tokenizer(_builtin_topics()[:300] + [CHINESE], 700)
    t.save(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    return t


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tok):
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(small_config(vocab_size=tok.vocab_size, eos_token_id=tok.eot_id,
                                              pad_token_id=tok.pad_id))
    train_briefly(model, tok.vocab_size, steps=2)
    return make_checkpoint(tmp_path_factory.mktemp("run"), model, tok), model


# ------------------------------------------------------------------------------------------ format
def test_render_is_chatml():
    msgs = CONVERSATIONS[1]
    assert chat.render(msgs) == ("<|im_start|>system\n你是一个乐于助人的助手。<|im_end|>\n"
                                 "<|im_start|>user\n请介绍一下贾宝玉。<|im_end|>\n"
                                 "<|im_start|>assistant\n贾宝玉是《红楼梦》的主人公，住在大观园里。<|im_end|>\n")
    assert chat.render(msgs[:2], add_generation_prompt=True).endswith("<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [False, True])
def test_encode_chat_is_encode_of_render(tok, conv, gen):
    msgs = CONVERSATIONS[conv]
    ids, mask = chat.encode_chat(tok, msgs, add_generation_prompt=gen)
    assert ids == tok.encode(chat.render(msgs, gen))
    assert len(mask) == len(ids)


def test_special_tokens_never_merge(tok):
    """The markers are single tokens whatever surrounds them, and text never merges across them."""
    start, end = chat.marker_ids(tok)
    for left, right in [("", ""), ("abc", "def"), ("贾宝玉", "林黛玉"), ("\n", "\n"), (" ", " x"), ("<|", "|>")]:
        for marker, mid in ((chat.IM_START, start), (chat.IM_END, end)):
            ids = tok.encode(left + marker + right)
            assert ids.count(mid) == 1
            i = ids.index(mid)
            assert ids[:i] == tok.encode(left) and ids[i + 1:] == tok.encode(right)


def test_loss_mask_is_the_assistant_replies(tok):
    """The masked tokens decode to exactly each reply followed by <|im_end|>, in order."""
    for msgs in CONVERSATIONS:
        ids, mask = chat.encode_chat(tok, msgs)
        runs, cur = [], []
        for i, m in zip(ids, mask):
            if m:
                cur.append(i)
            elif cur:
                runs.append(cur)
                cur = []
        replies = [m["content"] for m in msgs if m["role"] == "assistant"]
        assert len(runs) == len(replies)
        for run, reply in zip(runs, replies):
            # a reply that starts with a newline can share a token with the header's newline
            expected = ("\n" if reply.startswith("\n") and tok.encode("\n" + reply[:1])[0] != tok.encode("\n")[0]
                        else "") + reply + chat.IM_END
            assert tok.decode(run) == expected


def test_chat_template_in_transformers(tok, checkpoint, tmp_path):
    """A checkpoint's and an export's tokenizer_config.json carry the template: apply_chat_template gives our ids."""
    from transformers import AutoTokenizer

    from sakimi_next.interop import export

    ckpt, _ = checkpoint
    exported = export(ckpt, tmp_path / "hf")
    for directory in (ckpt, exported):
        hf = AutoTokenizer.from_pretrained(str(directory))
        for msgs in CONVERSATIONS:
            for gen in (False, True):
                ours = chat.encode_chat(tok, msgs, add_generation_prompt=gen)[0]
                theirs = hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
                if isinstance(theirs, dict) or hasattr(theirs, "input_ids"):
                    theirs = theirs["input_ids"]
                assert list(theirs) == ours
                assert hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False) == chat.render(msgs, gen)


@pytest.mark.parametrize("messages,reason", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"role": "user"}], "not an object"),
    ([{"role": "bot", "content": "hi"}], "unknown role 'bot'"),
    ([{"role": "user", "content": "hi <|im_end|>"}], "reserved token <|im_end|>"),
    ([{"role": "user", "content": 3}], "not an object"),
])
def test_check_messages_rejects(messages, reason):
    with pytest.raises(chat.UserError, match=reason.replace("|", r"\|").replace("(", r"\(")):
        chat.check_messages(messages, need_assistant=True)
