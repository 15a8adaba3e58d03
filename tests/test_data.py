"""--mode prepare_data: documents, the split, token files, meta.json, reuse, and bad input."""

import json
import re

import numpy as np
import pytest

from sakimi_next import data
from sakimi_next.data import prepare, sources
from sakimi_next.data.split import VAL_STRETCHES
from sakimi_next.config import preset
from sakimi_next.data import check_vocab, load_meta, load_tokenizer, open_split, split_documents
from sakimi_next.tokenizer import Tokenizer, train_tokenizer
from sakimi_next.util import UserError

from .helpers import chinese_text, english_text

ENGLISH = "\n\n".join(
    f"Story {i}. Once upon a time, a little {animal} named {name} lived near the river.\n"
    f"Every day {name} counted {i * 7} stones and sang a song about the {animal}s."
    for i, (animal, name) in enumerate([("fox", "Lily"), ("bear", "Tom"), ("owl", "Sue"), ("cat", "Max"),
                                        ("dog", "Ben"), ("frog", "Amy"), ("duck", "Tim"), ("hen", "Zoe")] * 3)
) + "\n"
CHINESE = "".join(f"第{i}回 贾宝玉和林黛玉在大观园里读书，薛宝钗笑道：“你们又在这里说什么？”王熙凤说了{i}句话。\n"
                  for i in range(30))  # one paragraph a line, no blank lines
SMALL = ["--config", "tiny_5m", "--vocab-size", "400"]
PARAS = ["--doc-split", "blank-line"]  # paragraphs as documents (the default keeps each file whole)


def english_docs(text=ENGLISH):
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]


def chinese_docs(text=CHINESE):
    return [line for line in text.split("\n") if line.strip()]


def paragraph_docs():
    """The corpus fixture's documents with --doc-split blank-line (zh.txt has no blank lines)."""
    return english_docs() + [CHINESE.rstrip("\n")]


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "en.txt").write_text(ENGLISH)
    (d / "zh.txt").write_text(CHINESE)
    return d


def documents_of(out_dir, split):
    """The decoded documents of a split, cut at the EOT tokens (the stream must end with one)."""
    ids = np.asarray(open_split(out_dir, split))
    tok = load_tokenizer(out_dir)
    ends = np.flatnonzero(ids == tok.eot_id)
    assert len(ids) and ends[-1] == len(ids) - 1
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(ids[s:e]) for s, e in zip(starts, ends)]


def snapshot(out_dir):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out_dir.iterdir())}


# ---------------------------------------------------------------------------------------------------
# the happy path


def test_end_to_end_files_and_meta(run, corpus, tmp_path):
    out = tmp_path / "out"
    rc, stdout, err = run("--train-data", corpus / "en.txt", corpus / "zh.txt", "--out-dir", out, *SMALL, *PARAS)
    assert rc == 0, err
    meta = load_meta(out)
    assert (meta["format"], meta["vocab_size"], meta["dtype"]) == (1, 400, "uint16")
    assert (meta["eot_id"], meta["pad_id"]) == (0, 1)
    assert meta["tokenizer"] == "tokenizer.json"
    assert [s["doc_split"] for s in meta["sources"]] == ["blank-line", "blank-line"]
    expected = paragraph_docs()
    for name, split in meta["splits"].items():
        assert (out / split["file"]).stat().st_size == 2 * split["tokens"]
        assert len(open_split(out, name)) == split["tokens"]
    train, val = documents_of(out, "train"), documents_of(out, "val")
    assert len(val) == round(0.1 * len(expected)) == meta["splits"]["val"]["documents"]
    assert len(train) == meta["splits"]["train"]["documents"]
    # every document lands whole in exactly one split, in order
    assert sorted(train + val) == sorted(expected)
    assert [d for d in expected if d in train] == train
    for name, docs in (("train", train), ("val", val)):
        assert meta["splits"][name]["bytes"] == sum(len(d.encode()) for d in docs)
    assert "bytes/token" in stdout and "up to date" not in stdout
    assert not list(out.glob(".*"))  # no temporary files left


def test_reuse_and_rebuild(run, corpus, tmp_path):
    out = tmp_path / "out"
    args = ("--train-data", corpus, "--out-dir", out, *SMALL, *PARAS)
    assert run(*args)[0] == 0
    before = snapshot(out)
    rc, stdout, _ = run(*args)
    assert rc == 0 and "up to date" in stdout and "training" not in stdout
    assert snapshot(out) == before  # not even rewritten

    # changed settings: the tokens are rebuilt, and this directory's own tokenizer is retrained
    rc, stdout, _ = run(*args, "--val-fraction", "0.2")
    assert rc == 0 and "up to date" not in stdout and "settings changed" in stdout
    assert load_meta(out)["splits"]["val"]["documents"] == round(0.2 * len(paragraph_docs()))

    # changed input content
    (corpus / "zh.txt").write_text(CHINESE + "\n新的一段。\n")
    rc, stdout, _ = run(*args, "--val-fraction", "0.2")
    assert rc == 0 and "training data or settings changed" in stdout
    assert load_meta(out)["splits"]["train"]["documents"] + load_meta(out)["splits"]["val"]["documents"] == \
        len(paragraph_docs()) + 1
    rc, stdout, _ = run(*args, "--val-fraction", "0.2")
    assert "up to date" in stdout

    rc, stdout, _ = run(*args, "--val-fraction", "0.2", "--rebuild-tokenizer")
    assert rc == 0 and "(--rebuild-tokenizer)" in stdout and "up to date" not in stdout


def test_deterministic_outputs(run, corpus, tmp_path):
    for name in ("a", "b"):
        assert run("--train-data", corpus, "--out-dir", tmp_path / name, *SMALL, *PARAS)[0] == 0
    for f in ("train.bin", "val.bin", "tokenizer.json", "meta.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    # another seed holds out other documents
    assert run("--train-data", corpus, "--out-dir", tmp_path / "c", "--seed", "1", *SMALL, *PARAS)[0] == 0
    assert documents_of(tmp_path / "a", "val") != documents_of(tmp_path / "c", "val")


def test_val_data_jsonl_and_glob(run, tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n"
                                              for i, d in enumerate(english_docs())) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "另一个\n\n记录"}, ensure_ascii=False) + "\n")
    (tmp_path / "val.txt").write_text(CHINESE)
    out = tmp_path / "out"
    rc, _, err = run("--train-data", tmp_path / "*.jsonl", "--val-data", tmp_path / "val.txt", "--out-dir", out,
                     "--config", "tiny_5m", "--vocab-size", "300")
    assert rc == 0, err
    assert documents_of(out, "train") == english_docs() + ["另一个\n\n记录"]  # a record is a document
    assert documents_of(out, "val") == [CHINESE]  # a .txt file is one document, as written
    meta = load_meta(out)
    assert [s["role"] for s in meta["sources"]] == ["train", "train", "val"]
    assert meta["settings"]["val_fraction"] is None


def test_doc_split_modes(run, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("a b c\nd e f\n\n\ng h\r\n  \r\ni j\n")
    expected = {"blank-line": ["a b c\nd e f", "g h", "i j"], "line": ["a b c", "d e f", "g h", "i j"],
                "file": ["a b c\nd e f\n\n\ng h\r\n  \r\ni j\n"]}
    for mode, docs in expected.items():
        assert [p for p, last in split_documents([f.read_bytes().decode()], mode)] == docs
    # through the CLI, with a tokenizer from elsewhere (the text is too small to train one)
    tok = train_tokenizer([ENGLISH], 300)
    tok.save(tmp_path / "tok.json")
    for mode in ("line", "file"):
        rc, _, err = run("--train-data", f, f, "--val-data", f, "--doc-split", mode, "--tokenizer",
                         tmp_path / "tok.json", "--out-dir", tmp_path / mode)
        assert rc == 0, err
        assert documents_of(tmp_path / mode, "val") == expected[mode]
        assert documents_of(tmp_path / mode, "train") == expected[mode]  # the same file named twice counts once


def test_split_documents_blocks_and_pieces(monkeypatch):
    text = "\n\n" + ENGLISH.replace("\n", "\r\n") + "\n \n\t\n" + CHINESE + "\n\n   \n"
    whole = list(split_documents([text], "blank-line"))
    assert all(last for _, last in whole) and "" not in [p for p, _ in whole]
    # any block boundaries give the same documents, CRLF separators included
    for size in (1, 2, 3, 7, 64):
        blocks = [text[i:i + size] for i in range(0, len(text), size)]
        assert list(split_documents(blocks, "blank-line")) == whole
    # long documents come out in pieces that join up to the document
    monkeypatch.setattr(sources, "MAX_PIECE_CHARS", 50)
    pieces = list(split_documents([text], "file"))
    assert len(pieces) > 10 and [last for _, last in pieces] == [False] * (len(pieces) - 1) + [True]
    assert all(len(p) <= 50 for p, _ in pieces)
    assert "".join(p for p, _ in pieces) == text  # kept as written


# ---------------------------------------------------------------------------------------------------
# a one-file corpus: kept as written, validation held out as stretches at line boundaries


def docs_text(n_chars: int, crlf: bool = False) -> str:
    """The embedded CPython docs, ~n_chars of them, blank lines and all, with no final newline."""
    text = "\n\n\n".join(data.builtin_topics())[:n_chars].rstrip("\n")
    return text.replace("\n", "\r\n") if crlf else text


def stream_text(out_dir, split) -> tuple[str, int]:
    """The decoded tokens of a split with the end-of-text tokens left out, and how many there were."""
    ids = np.asarray(open_split(out_dir, split))
    tok = load_tokenizer(out_dir)
    return tok.decode(ids[ids != tok.eot_id]), int((ids == tok.eot_id).sum())


@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
def test_one_file_round_trip_byte_for_byte(run, tmp_path, crlf):
    text = docs_text(60_000, crlf)
    assert "\n\n\n" in text.replace("\r", "") and not text.endswith("\n")
    f = tmp_path / "book.txt"
    f.write_bytes(text.encode())
    out = tmp_path / "out"
    rc, stdout, err = run("--train-data", f, "--out-dir", out, "--config", "tiny_5m", "--vocab-size", "300")
    assert rc == 0, err
    meta = load_meta(out)
    stretches = meta["val_stretches"]
    assert meta["sources"][0]["doc_split"] == "file" and "stretches of the text" in stdout
    train = "".join(text[a:b] for a, b in zip([0] + [e for _, e in stretches], [s for s, _ in stretches] + [len(text)]))
    val = "".join(text[a:b] for a, b in stretches)
    train_decoded, train_eots = stream_text(out, "train")
    val_decoded, val_eots = stream_text(out, "val")
    assert train_decoded.encode() == train.encode()  # byte for byte, \r and blank lines included
    assert val_decoded.encode() == val.encode()
    assert val_eots == len(stretches) and train_eots == meta["splits"]["train"]["documents"]
    assert meta["splits"]["val"]["bytes"] == len(val.encode())
    assert meta["splits"]["train"]["bytes"] == len(train.encode())

    # with --val-data, the whole file is one training document, exactly as written
    rc, _, err = run("--train-data", f, "--val-data", f, "--out-dir", tmp_path / "whole", "--config", "tiny_5m",
                     "--vocab-size", "300")
    assert rc == 0, err
    assert documents_of(tmp_path / "whole", "train") == [text]


def test_val_stretches_at_line_boundaries_from_the_seed(run, tmp_path):
    text = docs_text(200_000) + "\n"
    f = tmp_path / "book.txt"
    f.write_text(text)
    stretches = {}
    for seed in (0, 0, 1):
        out = tmp_path / f"out{seed}"
        rc, _, err = run("--train-data", f, "--out-dir", out, "--seed", seed, "--config", "tiny_5m",
                         "--vocab-size", "300")
        assert rc == 0, err
        stretches.setdefault(seed, []).append(load_meta(out)["val_stretches"])
    assert stretches[0][0] == stretches[0][1] != stretches[1][0]  # the seed decides, and only the seed
    for got in (stretches[0][0], stretches[1][0]):
        assert 2 <= len(got) <= VAL_STRETCHES
        flat = [x for pair in got for x in pair]
        assert flat == sorted(flat) and len(set(flat)) == len(flat)  # apart and in order
        assert all(text[x - 1] == "\n" for x in flat if 0 < x < len(text))  # at line starts
        held = sum(b - a for a, b in got)
        assert 0.09 < held / len(text) < 0.11  # about --val-fraction of the text
    # the cuts follow line boundaries whatever the pieces the text is read in
    cuts = data.plan_val_stretches(len(text), 0.1, 3)
    pieces = [text[i:i + 97] for i in range(0, len(text), 97)]
    assert data.snap_to_lines([text], cuts) == data.snap_to_lines(pieces, cuts)


def test_small_blocks_and_pieces_give_the_same_tokens(run, corpus, tmp_path, monkeypatch):
    """Blocks that cut UTF-8 characters and documents tokenized in pieces change nothing."""
    long_doc = tmp_path / "long.txt"
    long_doc.write_text((ENGLISH + CHINESE) * 3)
    args = ("--train-data", corpus, long_doc, "--doc-split", "file", "--val-data", corpus / "zh.txt", *SMALL)
    assert run(*args, "--out-dir", tmp_path / "a")[0] == 0
    monkeypatch.setattr(sources, "BLOCK_BYTES", 7)
    monkeypatch.setattr(sources, "MAX_PIECE_CHARS", 100)
    monkeypatch.setattr(prepare, "ENCODE_BATCH_BYTES", 500)
    assert run(*args, "--out-dir", tmp_path / "b")[0] == 0
    for f in ("train.bin", "val.bin", "tokenizer.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_embedded_default_corpus(run, tmp_path):
    rc, stdout, err = run("--out-dir", tmp_path / "out", "--config", "tiny_5m", "--vocab-size", "300")
    assert rc == 0, err
    assert "embedded CPython documentation" in stdout
    meta = load_meta(tmp_path / "out")
    assert meta["sources"][0]["path"].startswith("pydoc_data.topics")
    assert meta["splits"]["train"]["documents"] > 60 and meta["splits"]["val"]["documents"] >= 7


def test_vocab_versus_config(run, tmp_path):
    out = tmp_path / "out"
    rc, _, err = run("--out-dir", out, "--config", "tiny_5m", "--vocab-size", "2100")
    assert rc == 2 and "--vocab-size (2,100) is larger than the model's vocab_size (2,048)" in err
    rc, stdout, err = run("--out-dir", out, "--config", "tiny_5m", "--vocab-size", "2100", "--allow-vocab-mismatch")
    assert rc == 0, err
    assert "vocab_size follows the tokenizer: 2,048 -> 2,100" in stdout
    tok = Tokenizer.load(out / "tokenizer.json")
    with pytest.raises(UserError, match="the tokenizer has 2,100 tokens but the model's vocab_size is 2,048"):
        check_vocab(preset("tiny_5m"), tok, allow_mismatch=False)
    cfg = check_vocab(preset("tiny_5m"), tok, allow_mismatch=True)
    assert (cfg.vocab_size, cfg.eos_token_id, cfg.pad_token_id) == (2100, 0, 1)
    cfg = check_vocab(preset("tiny_10m"), tok, allow_mismatch=False)  # a smaller tokenizer fits as it is
    assert (cfg.vocab_size, cfg.eos_token_id, cfg.pad_token_id) == (4096, 0, 1)

    # a tokenizer from elsewhere is used as it is, but not when --vocab-size asks for another size
    other = tmp_path / "other"
    rc, stdout, err = run("--out-dir", other, "--tokenizer", out / "tokenizer.json", "--config", "tiny_10m")
    assert rc == 0 and f"using {out / 'tokenizer.json'}" in stdout, err
    assert load_meta(other)["tokenizer"] == str((out / "tokenizer.json").resolve())
    assert load_meta(other)["tokenizer_training"] is None
    rc, _, err = run("--out-dir", other, "--tokenizer", out / "tokenizer.json", "--vocab-size", "1000")
    assert rc == 2 and "has 2,100 tokens, not the --vocab-size 1,000 asked for" in err


def test_interrupted_run_leaves_the_previous_outputs(run, corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ("--train-data", corpus, "--out-dir", out, *SMALL, *PARAS)
    assert run(*args)[0] == 0
    before = snapshot(out)
    calls = []

    def interrupted(self, texts):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, texts)

    original = Tokenizer.encode_batch
    monkeypatch.setattr(Tokenizer, "encode_batch", interrupted)
    monkeypatch.setattr(prepare, "ENCODE_BATCH_BYTES", 300)
    rc, _, err = run(*args, "--rebuild-tokenizer")
    assert rc == 130 and err.strip() == "interrupted"
    assert snapshot(out) == before  # old files intact, no temporary files left

    fresh = tmp_path / "fresh"
    calls.clear()
    assert run("--train-data", corpus, "--out-dir", fresh, *SMALL, *PARAS)[0] == 130
    assert not fresh.exists()  # nothing that looks complete, nothing half-written
    fresh.mkdir()
    with pytest.raises(UserError, match="has no meta.json"):
        load_meta(fresh)


# ---------------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit code 2, nothing written


def bad_inputs(tmp_path):
    d = tmp_path
    (d / "empty.txt").write_bytes(b"")
    (d / "blank.txt").write_text(" \n\n \t\n")
    (d / "emptydir").mkdir()
    (d / "pdfs").mkdir()
    (d / "pdfs" / "a.pdf").write_bytes(b"%PDF")
    (d / "latin1.txt").write_bytes(b"hello world\n" * 5 + b"caf\xe9\n")
    (d / "bad.jsonl").write_bytes(b'{"text": "ok"}\n' + b'{"text": "caf\xe9"}\n')
    (d / "notjson.jsonl").write_text('{"text": "ok"}\n{"text": "broken\n')
    (d / "notext.jsonl").write_text('{"text": "ok"}\n\n{"body": "no text"}\n')
    (d / "one.txt").write_text("a single document with no blank lines")
    (d / "en.txt").write_text(ENGLISH)
    (d / "afile").write_text("x")
    (d / "notatok.json").write_text('{"version": "1.0"}')
    en = ["--train-data", d / "en.txt"]
    return {
        "missing": (["--train-data", d / "nope.txt"], f"{d / 'nope.txt'} does not exist"),
        "empty file": (["--train-data", d / "empty.txt"], f"{d / 'empty.txt'} is empty"),
        "empty dir": (["--train-data", d / "emptydir"], "contains no .txt, .jsonl or .parquet files"),
        "no text files": (["--train-data", d / "pdfs"], "contains no .txt, .jsonl or .parquet files"),
        "glob": (["--train-data", d / "*.md"], f"no files match {d / '*.md'}"),
        "whitespace only": (["--train-data", d / "blank.txt"], "the training data has no text"),
        "not utf-8": (["--train-data", d / "latin1.txt"],
                      f"{d / 'latin1.txt'} is not valid UTF-8 (invalid continuation byte at byte offset 63); "
                      "convert it to UTF-8 or pass --encoding-errors replace"),
        "jsonl not utf-8": (["--train-data", d / "bad.jsonl"], "at byte offset 28, line 2"),
        "not json": (["--train-data", d / "notjson.jsonl"], f"{d / 'notjson.jsonl'}:2: not valid JSON"),
        "no text field": (["--train-data", d / "notext.jsonl"],
                          f'{d / "notext.jsonl"}:3: no "text" field in this record (it has: body)'),
        "too small for vocab": ([*en, "--vocab-size", "2000"], "too small for a vocabulary of 2,000"),
        "too small for val": (["--train-data", d / "one.txt"], "too few lines to hold out a validation split"),
        "val fraction": ([*en, "--val-fraction", "1.0"], "--val-fraction (1.0) must be in [0, 1)"),
        "vocab below bytes": ([*en, "--vocab-size", "100"], "must be at least 260"),
        "unwritable out dir": ([*en, "--out-dir", d / "afile" / "out"], "cannot write to"),
        "not a tokenizer": ([*en, "--tokenizer", d / "notatok.json"], "notatok.json is not a tokenizer.json"),
        "empty val": ([*en, "--val-data", d / "blank.txt"], "the validation data has no text"),
        "two dirs": ([*en, "--out-dir", d / "out", "--data-dir", d / "other"], "--out-dir"),
    }


BAD_CASES = ["missing", "empty file", "empty dir", "no text files", "glob", "whitespace only", "not utf-8",
             "jsonl not utf-8", "not json", "no text field", "too small for vocab", "too small for val", "val fraction",
             "vocab below bytes", "unwritable out dir", "not a tokenizer", "empty val", "two dirs"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input(run, tmp_path, case):
    args, needle = bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    if "--out-dir" not in args:
        args = [*args, "--out-dir", out]
    rc, _, err = run(*args, "--config", "tiny_5m")
    assert rc == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert needle in err
    assert not out.exists()


def test_file_edited_while_preparing(run, corpus, tmp_path, monkeypatch):
    scan = prepare.scan_sources

    def scan_then_edit(sources, *args):
        result = scan(sources, *args)
        with open(corpus / "zh.txt", "a") as f:
            f.write("又一行。\n")
        return result

    monkeypatch.setattr(prepare, "scan_sources", scan_then_edit)
    rc, _, err = run("--train-data", corpus, "--out-dir", tmp_path / "out", *SMALL, *PARAS)
    assert rc == 2 and err == f"error: {corpus / 'zh.txt'} changed while it was being read; run again\n"
    assert not (tmp_path / "out").exists()


def test_encoding_errors_replace(run, tmp_path):
    bad_inputs(tmp_path)
    (tmp_path / "latin1.txt").write_bytes(ENGLISH.encode() + b"\n\ncaf\xe9 au lait\n")
    rc, _, err = run("--train-data", tmp_path / "latin1.txt", "--encoding-errors", "replace", "--out-dir",
                     tmp_path / "out", "--config", "tiny_5m", "--vocab-size", "300")
    assert rc == 0, err
    docs = documents_of(tmp_path / "out", "train") + documents_of(tmp_path / "out", "val")
    assert "caf\ufffd au lait\n" in "".join(docs)


def test_reading_prepared_data_errors(run, corpus, tmp_path):
    with pytest.raises(UserError, match="data directory not found"):
        load_meta(tmp_path / "nothing")
    out = tmp_path / "out"
    assert run("--train-data", corpus, "--out-dir", out, *SMALL, *PARAS)[0] == 0
    with pytest.raises(UserError, match="no 'test' split"):
        open_split(out, "test")
    ids = open_split(out, "val")
    assert ids.dtype == np.dtype("<u2") and not ids.flags.writeable
    with open(out / "val.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(UserError, match="val.bin is missing or not"):
        open_split(out, "val")
    (out / "meta.json").write_text("{")
    with pytest.raises(UserError, match="is not readable JSON"):
        load_meta(out)


# ---------------------------------------------------------------------------------------------------
# a small real corpus


def test_larger_corpus_end_to_end(run, tmp_path):
    en = english_text(100_000)
    zh = chinese_text(33_000)
    (tmp_path / "en.txt").write_text(en)
    (tmp_path / "zh.txt").write_text(zh)
    out = tmp_path / "out"
    rc, stdout, err = run("--train-data", tmp_path / "en.txt", tmp_path / "zh.txt", "--out-dir", out,
                          "--config", "tiny_5m", "--doc-split", "line")
    assert rc == 0, err
    meta = load_meta(out)
    assert meta["vocab_size"] == 2048
    assert [s["doc_split"] for s in meta["sources"]] == ["line", "line"]
    docs = documents_of(out, "train") + documents_of(out, "val")
    assert sorted(docs) == sorted(chinese_docs(en) + chinese_docs(zh))  # one document a line
    tok = load_tokenizer(out)
    en_bpt = len(en.encode()) / len(tok.encode(en))
    zh_bpt = len(zh.encode()) / len(tok.encode(zh))
    assert en_bpt > 3.0 and zh_bpt > 2.0, (en_bpt, zh_bpt)  # real compression on both languages
    assert run("--train-data", tmp_path / "en.txt", tmp_path / "zh.txt", "--out-dir", out,
               "--config", "tiny_5m", "--doc-split", "line")[1].count("up to date") == 1


def test_a_few_files_hold_out_stretches_across_them(run, tmp_path):
    """Two files are two documents: holding out a whole one would take half the text, so stretches of
    about --val-fraction are held out across both, and every byte lands in one split, in order."""
    texts = [docs_text(30_000), docs_text(20_000).replace("e", "a")]
    files = []
    for i, t in enumerate(texts):
        files.append(tmp_path / f"part{i}.txt")
        files[-1].write_text(t)
    out = tmp_path / "out"
    rc, stdout, err = run("--train-data", *files, "--out-dir", out, "--config", "tiny_5m", "--vocab-size", "300")
    assert rc == 0, err
    assert "stretches of the text" in stdout and "documents held out" not in stdout
    whole = "".join(texts)  # the cuts count across the files, one after the other
    stretches = load_meta(out)["val_stretches"]
    held = sum(b - a for a, b in stretches)
    assert 0.08 < held / len(whole) < 0.12
    val = "".join(whole[a:b] for a, b in stretches)
    kept = zip([0] + [e for _, e in stretches], [s for s, _ in stretches] + [len(whole)])
    train = "".join(whole[a:b] for a, b in kept)
    assert stream_text(out, "val")[0] == val and stream_text(out, "train")[0] == train
    # paragraphs as documents: there are enough of them for whole ones to come near 10%
    rc, stdout, _ = run("--train-data", files[0], "--out-dir", tmp_path / "paras", "--config", "tiny_5m",
                        "--vocab-size", "300", *PARAS)
    assert rc == 0 and "documents held out" in stdout
