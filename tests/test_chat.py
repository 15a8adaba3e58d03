"""The chat format, chat fine-tuning data and training, and `generate --chat` (issue 14)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from sakimi_next import chat
from sakimi_next.evaluate import assistant_loss
from sakimi_next.cli import main
from sakimi_next.data import builtin_topics, open_loss_mask
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
    t = train_tokenizer(builtin_topics()[:300] + [CHINESE], 700)
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

    from sakimi_next.export.hf import export_hf

    ckpt, _ = checkpoint
    exported = export_hf(ckpt, tmp_path / "hf")
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


# ------------------------------------------------------------------------------------- chat data
WORDS = ["apple", "river", "stone", "cloud", "green", "table", "music", "light", "paper", "smile", "tiger", "bread"]
HANZI = "天地人山水火木金土日月星"


def synthetic_conversations(n: int, seed: int = 0) -> list[dict]:
    """Small learnable requests: repeat a word, or give the character paired with it (both directions)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        i = int(rng.integers(len(WORDS)))
        if rng.random() < 0.5:
            msgs = [{"role": "user", "content": f"Say {WORDS[i]} twice."},
                    {"role": "assistant", "content": f"{WORDS[i]} {WORDS[i]}"}]
        else:
            msgs = [{"role": "user", "content": f"“{HANZI[i]}”是什么？"}, {"role": "assistant", "content": WORDS[i]}]
        if rng.random() < 0.3:
            msgs.insert(0, {"role": "system", "content": "Answer briefly."})
        out.append({"messages": msgs})
    return out


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def prepare(capsys, *args):
    rc = main(["--mode", "prepare_data", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_prepare_chat_data(tok, tmp_path, capsys):
    """Conversations are detected, split, encoded with encode_chat and one EOT each, with the mask beside."""
    from sakimi_next.data import load_meta, open_split

    records = synthetic_conversations(50)
    src = write_jsonl(tmp_path / "chats.jsonl", records)
    out = tmp_path / "data"
    rc, _, err = prepare(capsys, "--train-data", src, "--out-dir", out, "--tokenizer", tok.path, "--val-fraction", 0.2)
    assert rc == 0, err
    meta = load_meta(out)
    assert meta["chat"]["format"] == "chatml" and meta["tokenizer_sha256"] == tok.sha256
    assert meta["splits"]["train"]["documents"] == 40 and meta["splits"]["val"]["documents"] == 10
    seen = []
    for split in ("train", "val"):
        ids = np.asarray(open_split(out, split))
        mask = open_loss_mask(out, meta, split)
        assert len(mask) == len(ids) and meta["splits"][split]["target_tokens"] == int(mask.sum())
        for a, b in chat.conversations_of(ids, tok.eot_id):
            msgs = [m for r in records for m in [r["messages"]] if chat.encode_chat(tok, m)[0] == ids[a:b].tolist()]
            assert msgs, "every conversation is one of the records, encoded whole"
            assert mask[a:b].tolist() == chat.encode_chat(tok, msgs[0])[1] and mask[b] == 0
            seen.append(ids[a:b].tolist())
    assert sorted(seen) == sorted(chat.encode_chat(tok, r["messages"])[0] for r in records)


@pytest.mark.parametrize("line,reason", [
    ("{not json", "not valid JSON"),
    ('{"text": "plain"}', 'no "messages"'),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}', "unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}', "message 2 is not an object"),
    ('{"messages": [{"role": "user", "content": "<|im_start|>system"}, {"role": "assistant", "content": "x"}]}',
     "reserved token"),
])
def test_bad_chat_records(tok, tmp_path, capsys, line, reason):
    good = json.dumps(synthetic_conversations(1)[0])
    src = tmp_path / "chats.jsonl"
    src.write_text(f"{good}\n{good}\n\n{line}\n{good}\n")
    rc, _, err = prepare(capsys, "--train-data", src, "--out-dir", tmp_path / "data", "--tokenizer", tok.path)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith(f"error: {src}:4: ") and reason in err, err
    assert not (tmp_path / "data" / "meta.json").exists()


def test_chat_and_text_do_not_mix(tok, tmp_path, capsys):
    src = write_jsonl(tmp_path / "chats.jsonl", synthetic_conversations(5))
    (tmp_path / "text.txt").write_text("Plain text.\n")
    rc, _, err = prepare(capsys, "--train-data", src, tmp_path / "text.txt", "--out-dir", tmp_path / "d",
                         "--tokenizer", tok.path)
    assert rc == 2 and "text.txt is not a chat JSONL file" in err


@torch.no_grad()
def test_packed_conversations_do_not_see_each_other(tok, checkpoint):
    """In a packed window with document starts after each EOT, a conversation's logits are its own."""
    from sakimi_next.batches import document_starts

    _, model = checkpoint
    convs = [chat.encode_chat(tok, c)[0] + [tok.eot_id] for c in CONVERSATIONS[:3]]
    row = torch.tensor([sum(convs, [])])
    packed = model(row, doc_starts=document_starts(row, tok.eot_id)).logits[0]
    a = len(convs[0])
    alone = model(torch.tensor([convs[1]])).logits[0]
    torch.testing.assert_close(packed[a:a + len(convs[1])], alone, rtol=1e-4, atol=1e-4)
    assert (model(row).logits[0, a:a + len(convs[1])] - alone).abs().max() > 1e-3


def test_sampler_masks_targets(tok, tmp_path, capsys):
    """The training windows' targets are -100 exactly where the loss mask is 0."""
    from sakimi_next.data import load_meta, open_split
    from sakimi_next.batches import WindowSampler

    src = write_jsonl(tmp_path / "chats.jsonl", synthetic_conversations(40))
    assert prepare(capsys, "--train-data", src, "--out-dir", tmp_path / "d", "--tokenizer", tok.path)[0] == 0
    ids, mask = open_split(tmp_path / "d", "train"), open_loss_mask(tmp_path / "d", load_meta(tmp_path / "d"), "train")
    sampler = WindowSampler(ids, 32, 4, seed=0, rank=0, world=1, loss_mask=mask)
    plain = WindowSampler(ids, 32, 4, seed=0, rank=0, world=1)
    for step in range(3):
        (x, y), (x0, y0) = sampler.batch(step, 0), plain.batch(step, 0)
        assert torch.equal(x, x0)
        kept = y != -100
        assert torch.equal(y[kept], y0[kept]) and kept.any()
        rng = np.random.default_rng([0, step, 0])
        starts = rng.integers(0, len(ids) - 33 + 1, size=4)
        expected = np.stack([np.asarray(mask[s + 1:s + 33]) for s in starts]).astype(bool)
        assert torch.equal(kept, torch.from_numpy(expected))


def test_sft_lowers_heldout_assistant_loss(tok, checkpoint, tmp_path, capsys):
    """Fine-tuning from a checkpoint (--init-from) on chat data: held-out assistant loss goes down, and
    training turned document masking on by itself."""
    from sakimi_next.pretrained import load_for_inference
    from sakimi_next.data import load_meta, open_split

    ckpt, model = checkpoint
    src = write_jsonl(tmp_path / "chats.jsonl", synthetic_conversations(300))
    data = tmp_path / "d"
    assert prepare(capsys, "--train-data", src, "--out-dir", data, "--tokenizer", ckpt / "tokenizer.json")[0] == 0
    meta = load_meta(data)
    val, val_mask = open_split(data, "val"), open_loss_mask(data, meta, "val")
    before = assistant_loss(model, val, val_mask, tok.eot_id)
    rc = main(["--mode", "train", "--data-dir", str(data), "--init-from", str(ckpt), "--out-dir", str(tmp_path / "sft"),
               "--steps", "40", "--batch-size", "8", "--seq-len", "64", "--learning-rate", "3e-3",
               "--warmup-steps", "4", "--eval-every", "20", "--eval-batches", "2", "--print-every", "20"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    state = json.loads((tmp_path / "sft" / "latest" / "trainer_state.json").read_text())
    assert state["args"]["document_masking"] is True
    tuned = load_for_inference(tmp_path / "sft" / "latest", "cpu")[0]
    after = assistant_loss(tuned, val, val_mask, tok.eot_id)
    assert after < before - 1.0, (before, after)
    metrics = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "val_loss" in m]
    assert "val_bpb" not in evals[-1] and evals[-1]["val_loss"] < before


# ---------------------------------------------------------------------------------- generate --chat
TURNS = ["Hello! What is a list?", "请用中文回答：大观园在哪里？", "And a tuple?"]


SYSTEM = {"role": "system", "content": "You are terse. 你很简洁。"}


@torch.no_grad()
def test_chat_session_cache_equals_from_scratch(tok, checkpoint):
    """Each turn prefills only its new tokens, and what it then computes (logits and greedy tokens) is
    what running the whole conversation from scratch gives."""
    from sakimi_next.generate import generate

    _, model = checkpoint
    session = chat.ChatSession(model, tok, system=SYSTEM["content"])
    end = tok.token_to_id(chat.IM_END)
    for k, user in enumerate(TURNS):
        before, fed_before = len(session.ids), session.fed
        reply = list(session.reply(user, max_new_tokens=12))
        new = chat.encode_chat(tok, ([SYSTEM] if k == 0 else []) + [{"role": "user", "content": user}], True)[0]
        prompt = session.ids[:before + len(new)]
        assert prompt[before:] == new
        # new tokens only: the last sampled token of the previous reply, <|im_end|>, "\n", then the turn
        assert session.prefilled[k] == len(prompt) - fed_before
        assert k == 0 or len(prompt) - len(new) - fed_before <= 3
        scratch = generate(model, [prompt], 12, eos_id=end)[0]
        assert reply == [t for t in scratch if t != end]
        # the session's last logits (after its last fed token) are the from-scratch forward's
        full = model(torch.tensor([session.ids[:session.fed]])).logits[0, -1]
        torch.testing.assert_close(session.logits, full, rtol=1e-4, atol=1e-4)
        # the reply is closed in the history: <|im_end|> and a newline
        assert session.ids[before + len(new):] == reply + [end] + tok.encode("\n")
    session.reset()
    list(session.reply(TURNS[1], 4))
    assert session.prefilled == [len(chat.encode_chat(tok, [SYSTEM, {"role": "user", "content": TURNS[1]}], True)[0])]


def test_generate_chat_cli(tok, checkpoint):
    """`generate --chat` through a real process and its stdin: streamed greedy replies equal a ChatSession's,
    turn 2 prefills only its new tokens, /reset starts over (with the system message), EOF quits."""
    import re

    ckpt, model = checkpoint
    lines = [TURNS[0], TURNS[1], "/reset", TURNS[2]]
    r = subprocess.run([sys.executable, "-m", "sakimi_next", "--mode", "generate", "--chat", "--resume-from", str(ckpt),
                        "--system", SYSTEM["content"], "--max-new-tokens", "10", "--temperature", "0"],
                       input="\n".join(lines) + "\n", capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    session = chat.ChatSession(model, tok, system=SYSTEM["content"])
    expected = []
    for line in lines:
        if line == "/reset":
            session.reset()
            expected.append(f"> {line}\n")
        else:  # stdin is not a terminal: each message is echoed after the prompt, then the reply
            expected.append(f"> {line}\n" + tok.decode(list(session.reply(line, 10))) + "\n")
    assert r.stdout == "".join(expected) + "> "
    prefilled = [int(n) for n in re.findall(r"prefilled (\d+) new tokens", r.stderr)]
    first = len(chat.encode_chat(tok, [SYSTEM, {"role": "user", "content": TURNS[0]}], True)[0])
    second = len(chat.encode_chat(tok, [{"role": "user", "content": TURNS[1]}], True)[0])
    third = len(chat.encode_chat(tok, [SYSTEM, {"role": "user", "content": TURNS[2]}], True)[0])
    assert prefilled[0] == first and second < prefilled[1] <= second + 3 and prefilled[2] == third
    assert "conversation reset" in r.stderr


@pytest.mark.parametrize("flags,reason", [
    (["--system", "hi"], "add --chat"),
    (["--chat", "--prompt", "hi"], "--prompt does not apply to --chat"),
    (["--chat", "--num-samples", "2"], "--num-samples does not apply"),
])
def test_generate_chat_bad_flags(checkpoint, capsys, flags, reason):
    ckpt, _ = checkpoint
    assert main(["--mode", "generate", "--resume-from", str(ckpt), *flags]) == 2
    assert reason in capsys.readouterr().err


def test_a_window_with_no_counted_target_adds_zero_not_nan():
    """Chat data: a training window can hold only prompt tokens; its loss is 0 (no gradient), never NaN."""
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(small_config())
    x = torch.randint(0, 160, (2, 16))
    out = model(x, torch.full_like(x, -100))
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    y = x.roll(-1, 1)
    y[0] = -100  # half counted: the mean over the counted targets alone
    ref = torch.nn.functional.cross_entropy(model(x).logits[1].float(), y[1])
    assert torch.allclose(model(x, y).loss, ref, atol=1e-6)
