"""prepare_data on the formats people bring: Parquet and JSON Lines text rows (--text-field), folders mixing
them with .txt, bad rows, the readers' memory bound, and chat JSONL streamed."""

import json
import sys
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sakimi_next import chat
from sakimi_next.data import iter_documents, load_meta, load_tokenizer, open_loss_mask, open_split, resolve_sources
from sakimi_next.data import prepare_chat, sources
from sakimi_next.data.split import choose_val_docs
from sakimi_next.tokenizer import Tokenizer, train_tokenizer

from .helpers import chinese_text, english_text
from .test_chat import synthetic_conversations

SMALL = ["--config", "tiny_5m", "--vocab-size", "300"]


def text_rows() -> list[str]:
    """Rows as a data set has them: paragraphs, Chinese lines, a long one, odd whitespace, empty ones."""
    rows = [p for p in english_text(30_000).split("\n\n") if p.strip()]
    rows += chinese_text(3_000).splitlines()
    rows += ["  leading spaces,\r\nCRLF and a trailing newline\n", "emoji 🤖 and tabs\t", "", " \n\t ",
             "a row longer than a piece. " * 200]
    return rows


def documents(rows: list[str]) -> list[str]:
    """What each row becomes: a document exactly as written; a row of only whitespace is none."""
    return sorted(r for r in rows if r.strip())


def prepared_documents(out_dir) -> list[str]:
    """Every document of both splits, decoded, cut at the end-of-text tokens."""
    tok = load_tokenizer(out_dir)
    docs = []
    for split in ("train", "val"):
        ids = np.asarray(open_split(out_dir, split))
        ends = np.flatnonzero(ids == tok.eot_id)
        assert len(ids) and ends[-1] == len(ids) - 1
        docs += [tok.decode(ids[s:e]) for s, e in zip(np.concatenate([[0], ends[:-1] + 1]), ends)]
    return sorted(docs)


def write_parquet(path, column: str, rows: list[str], row_group_size: int = 16, **extra_columns):
    pq.write_table(pa.table({**extra_columns, column: rows}), path, row_group_size=row_group_size)
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_rows_round_trip(run, tmp_path, monkeypatch, kind):
    """Each row is a document: the prepared ids decode to the rows' text exactly, whatever the batches and
    pieces they were read and tokenized in."""
    monkeypatch.setattr(sources, "PARQUET_BATCH_ROWS", 5)  # batches cross the row groups (16 rows)
    monkeypatch.setattr(sources, "MAX_PIECE_CHARS", 1000)  # the long row is tokenized in pieces
    rows = text_rows()
    if kind == "parquet":  # the default column, beside others
        src, flags = write_parquet(tmp_path / "rows.parquet", "text", rows, id=list(range(len(rows)))), []
    else:  # another field, beside others
        src = write_jsonl(tmp_path / "rows.jsonl", [{"id": i, "body": r, "text": 0} for i, r in enumerate(rows)])
        flags = ["--text-field", "body"]
    out = tmp_path / "out"
    rc, stdout, err = run("--train-data", src, "--out-dir", out, *SMALL, *flags)
    assert rc == 0, err
    assert prepared_documents(out) == documents(rows)
    meta = load_meta(out)
    assert meta["sources"][0]["doc_split"] == ("row" if kind == "parquet" else "record")
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(documents(rows))
    assert meta["settings"].get("text_field") == (None if kind == "parquet" else "body")  # older directories: none
    rc, stdout, err = run("--train-data", src, "--out-dir", out, *SMALL, *flags)
    assert rc == 0 and "up to date" in stdout, err


def test_a_folder_mixing_formats(run, tmp_path):
    """A folder gives its .txt, .jsonl and .parquet files, recursively, in a stable order: a .txt file is one
    document, a record or a row one each; --text-field names the field and the column."""
    d = tmp_path / "corpus"
    (d / "more").mkdir(parents=True)
    book = english_text(12_000)
    (d / "a.txt").write_text(book)
    jsonl_rows, parquet_rows = text_rows()[:40], text_rows()[40:]
    write_jsonl(d / "b.jsonl", [{"body": r} for r in jsonl_rows])
    half = len(parquet_rows) // 2
    write_parquet(d / "c.parquet", "body", parquet_rows[:half])
    write_parquet(d / "more" / "d.parquet", "body", parquet_rows[half:], row_group_size=1000)
    (d / "notes.md").write_text("not read")
    out = tmp_path / "out"
    rc, stdout, err = run("--train-data", d, "--out-dir", out, *SMALL, "--text-field", "body")
    assert rc == 0, err
    assert prepared_documents(out) == documents([book] + jsonl_rows + parquet_rows)
    meta = load_meta(out)
    assert [(s["path"], s["doc_split"]) for s in meta["sources"]] == [
        (str(d / "a.txt"), "file"), (str(d / "b.jsonl"), "record"), (str(d / "c.parquet"), "row"),
        (str(d / "more" / "d.parquet"), "row")]


def test_parquet_text_size_sizes_the_auto_vocabulary(tmp_path):
    """A compressed Parquet file counts as the text it holds (its footer's uncompressed size), not its bytes
    on disk, where --config auto sizes the vocabulary."""
    rows = [f"row {i}: " + "the same words again and again. " * 20 for i in range(400)]
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": rows}), path, compression="zstd")
    src = resolve_sources([str(path)], "train")[0]
    text_bytes = sum(len(r.encode()) for r in rows)
    assert src.size < text_bytes / 5 and text_bytes <= src.text_size < 1.1 * text_bytes


# ------------------------------------------------------------------------------------------- bad rows
GOOD = json.dumps({"text": "a good row"})


@pytest.mark.parametrize("line,message", [
    ('{"text": "broken', "not valid JSON"),
    ('{"body": "no text here", "id": 7}', 'no "text" field in this record (it has: body, id); '
                                          "name the text field with --text-field"),
    ('{"text": 42}', '"text" is a number, not a string'),
    ('{"text": null}', '"text" is null, not a string'),
    ('{"text": ["a", "list"]}', '"text" is a list, not a string'),
    ('["text", "in a list"]', 'a list, not a JSON object; each line of a .jsonl file must be a JSON object with '
                              'a "text" string'),
], ids=["invalid json", "missing field", "number", "null", "list", "not an object"])
def test_bad_jsonl_rows(run, tmp_path, line, message):
    src = tmp_path / "rows.jsonl"
    src.write_text(f"{GOOD}\n\n{GOOD}\n{line}\n{GOOD}\n")
    rc, _, err = run("--train-data", src, "--out-dir", tmp_path / "out", *SMALL)
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {src}:4: ") and message in err, err  # line 4: blank lines count
    assert not (tmp_path / "out").exists()


def test_bad_parquet_files_and_rows(run, tmp_path):
    def error(path, *flags):
        rc, _, err = run("--train-data", path, "--out-dir", tmp_path / "out", *SMALL, *flags)
        assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert not (tmp_path / "out").exists()
        return err

    nulls = write_parquet(tmp_path / "nulls.parquet", "text", ["one", "two", None, "four"], row_group_size=2)
    assert error(nulls) == f'error: {nulls}, row 3: "text" is null, not a string\n'
    other = write_parquet(tmp_path / "other.parquet", "body", ["a", "b"], id=[1, 2])
    assert error(other) == (f'error: {other} has no column "text" (it has: id, body); '
                            "name the text column with --text-field\n")
    assert error(other, "--text-field", "id") == (f'error: {other}: column "id" holds int64, not strings; '
                                                   "name the text column with --text-field\n")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not a Parquet file\n" * 10)
    assert error(garbage).startswith(f"error: {garbage} is not a readable Parquet file (")
    assert error(tmp_path / "nulls.parquet", "--text-field", "").startswith("error: --text-field must name a field")


def test_parquet_without_pyarrow_is_one_line(run, tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "rows.parquet", "text", ["one", "two"])
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    rc, _, err = run("--train-data", path, "--out-dir", tmp_path / "out", *SMALL)
    assert rc == 2 and err == "error: reading .parquet files needs pyarrow: pip install 'sakimi-next[parquet]'\n"


# ------------------------------------------------------------------------------------------ streamed
def unique_rows(n_bytes: int, row_chars: int = 1200) -> list[str]:
    base = english_text(200_000)
    rows, size, i = [], 0, 0
    while size < n_bytes:
        start = (i * 7919) % (len(base) - row_chars)
        rows.append(f"{i}: {base[start:start + row_chars]}")
        size += len(rows[-1].encode())
        i += 1
    return rows


def test_parquet_reader_holds_a_batch_not_the_file(tmp_path, monkeypatch):
    """A file larger than what the reader may hold: one row group of ~24 MB of text is read PARQUET_BATCH_ROWS
    rows at a time, Arrow's memory and Python's both staying far below the file's text."""
    rows = unique_rows(24 << 20)
    path = write_parquet(tmp_path / "big.parquet", "text", rows, row_group_size=len(rows))
    text_bytes = sum(len(r.encode()) for r in rows)
    del rows
    monkeypatch.setattr(sources, "PARQUET_BATCH_ROWS", 64)
    batches = []
    iter_batches = pq.ParquetFile.iter_batches

    def spy(self, *a, **k):
        for batch in iter_batches(self, *a, **k):
            batches.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    src = resolve_sources([str(path)], "train")[0]
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    base, arrow_peak, n_docs, n_bytes = pa.total_allocated_bytes(), 0, 0, 0
    tracemalloc.start()
    try:
        for piece, last in iter_documents(src, "auto", "strict"):
            arrow_peak = max(arrow_peak, pa.total_allocated_bytes() - base)
            n_docs += last
            n_bytes += len(piece.encode())
        python_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n_docs == sum(batches) and n_bytes == text_bytes
    assert max(batches) == 64
    assert arrow_peak < text_bytes / 4, (arrow_peak, text_bytes)  # a buffer, a page, a batch (~5 MB measured)
    assert python_peak < text_bytes / 16, (python_peak, text_bytes)


def test_jsonl_reader_holds_a_line_not_the_file(tmp_path):
    """JSON Lines are read a line at a time: ~8 MB of records pass through well under 1 MB of memory."""
    rows = unique_rows(8 << 20)
    path = write_jsonl(tmp_path / "big.jsonl", [{"text": r} for r in rows])
    n_rows = len(rows)
    del rows
    src = resolve_sources([str(path)], "train")[0]
    tracemalloc.start()
    try:
        n_docs = sum(last for _, last in iter_documents(src, "auto", "strict"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n_docs == n_rows
    assert peak < 1 << 20, peak


# --------------------------------------------------------------------------------------------- chat
def prepare_chat_in_memory(train_files, val_files, val_fraction, seed, vocab_size):
    """The chat preparation as it was before it streamed (every conversation held in memory): the reference."""
    convs = {"train": [c for f in train_files for c in chat.read_conversations(f)],
             "val": [c for f in val_files for c in chat.read_conversations(f)]}
    if not convs["val"]:
        held = choose_val_docs(len(convs["train"]), val_fraction, seed)
        convs = {"train": [c for c, h in zip(convs["train"], held) if not h],
                 "val": [c for c, h in zip(convs["train"], held) if h]}
    tok = train_tokenizer((chat.render(c) for c in convs["train"]), vocab_size)
    out = {"tokenizer": tok.sha256}
    for split, items in convs.items():
        ids, mask = [], []
        for c in items:
            i, m = chat.encode_chat(tok, c)
            ids += i + [tok.eot_id]
            mask += m + [0]
        out[f"{split}.bin"] = np.asarray(ids, dtype=np.uint16).tobytes()
        out[f"{split}.mask.bin"] = np.asarray(mask, dtype=np.uint8).tobytes()
        out[split] = {"documents": len(items), "tokens": len(ids), "target_tokens": sum(mask),
                      "bytes": sum(len(chat.render(c).encode()) for c in items)}
    return out


@pytest.mark.parametrize("held_out", ["fraction", "val-data"])
def test_chat_jsonl_streamed_gives_the_same_bytes(run, tmp_path, monkeypatch, held_out):
    """Streamed (read three times, written in batches), chat data are byte for byte what holding every
    conversation in memory gave: token files, loss masks, the tokenizer and meta.json's counts."""
    monkeypatch.setattr(prepare_chat, "WRITE_BATCH_TOKENS", 100)  # many writes
    records = synthetic_conversations(120)
    a = write_jsonl(tmp_path / "a.jsonl", records[:70])
    b = write_jsonl(tmp_path / "b.jsonl", records[70:110])
    v = write_jsonl(tmp_path / "v.jsonl", records[110:])
    if held_out == "fraction":
        train, val, flags = [a, b], [], ["--val-fraction", "0.15", "--seed", "3"]
    else:
        train, val, flags = [a], [v], ["--val-data", v]
    out = tmp_path / "out"
    rc, _, err = run("--train-data", *train, "--out-dir", out, *SMALL, *flags)
    assert rc == 0, err
    expected = prepare_chat_in_memory(train, val, 0.15, 3, 300)
    meta = load_meta(out)
    assert load_tokenizer(out).sha256 == expected["tokenizer"]
    for split in ("train", "val"):
        assert (out / f"{split}.bin").read_bytes() == expected[f"{split}.bin"]
        assert (out / f"{split}.mask.bin").read_bytes() == expected[f"{split}.mask.bin"]
        assert {k: meta["splits"][split][k] for k in expected[split]} == expected[split]
        assert open_loss_mask(out, meta, split) is not None


def test_chat_preparation_holds_a_batch_not_the_file(tmp_path):
    """Preparing a file of conversations allocates far less than the file (holding them took more)."""
    records = synthetic_conversations(200)
    tok = train_tokenizer((chat.render(r["messages"]) for r in records), 300)
    tok.save(tmp_path / "tokenizer.json")
    path = write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": m["role"], "content": f"{i} {m['content']} " * 8} for m in r["messages"]]}
        for i, r in enumerate(records * 30)])
    src = resolve_sources([str(path)], "train")[0]
    tracemalloc.start()
    try:
        prepare_chat.prepare_chat_data([src], tmp_path / "out", tmp_path / "tokenizer.json", 300, 0.1, 0,
                                       _config(), False, False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert load_meta(tmp_path / "out")["splits"]["train"]["documents"] == 5_400
    assert peak < path.stat().st_size / 4, (peak, path.stat().st_size)  # held whole: more than the file
    assert Tokenizer.load(tmp_path / "tokenizer.json").sha256 == tok.sha256


def _config():
    from sakimi_next.config import preset

    return preset("tiny_5m")
