"""Sources, the token store (split, cache, exactness, errors), windows and `qwen3 prepare`."""

import json
import os

import numpy as np
import pyarrow
import pyarrow.parquet
import pytest
import torch

import qwen3.data.sources as sources
from qwen3.cli import main
from qwen3.data.sources import iter_pieces, kjv_books, parse_source
from qwen3.data.split import is_validation
from qwen3.data.store import prepare
from qwen3.data.tokenizer import train_tokenizer
from qwen3.data.windows import RandomWindows, eval_windows
from qwen3.errors import UserError

WORDS = "and the earth was without form void darkness upon face of deep spirit moved waters light".split()


def sentences(count: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return "".join(" ".join(rng.choice(WORDS, size=8)).capitalize() + ".\n" for _ in range(count))


@pytest.fixture(scope="module")
def books() -> list[str]:
    return kjv_books()


@pytest.fixture(scope="module")
def tokenizer_dir(books, tmp_path_factory):
    """A small tokenizer trained once on the default corpus, so most tests skip training one."""
    directory = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(books, vocab_size=512).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def kjv(tmp_path_factory):
    """The default corpus prepared once, training its own (small) tokenizer as `prepare` does."""
    return prepare([], vocab_size=512, cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


def split_documents(tokens: np.ndarray, eos: int) -> list[list[int]]:
    ids = tokens.tolist()
    assert ids[-1] == eos
    documents, start = [], 0
    for index, token in enumerate(ids):
        if token == eos:
            documents.append(ids[start:index])
            start = index + 1
    return documents


def iter_documents(sources: list[str]) -> list[str]:
    """Every non-blank document of the sources as one string, joined from the pieces they are read in."""
    documents, parts = [], []
    for piece, ends in iter_pieces([parse_source(spec) for spec in sources]):
        parts.append(piece)
        if ends:
            document, parts = "".join(parts), []
            if document.strip():
                documents.append(document)
    return documents


def prepare_small(sources, cache_dir, tokenizer_dir, **options):
    return prepare([str(source) for source in sources], tokenizer=str(tokenizer_dir), cache_dir=cache_dir,
                   progress=False, **options)


# --- the embedded corpus -------------------------------------------------------------------------


def test_kjv_books(books) -> None:
    assert len(books) == 66
    assert books[0].startswith("The First Book of Moses, called Genesis\n\nIn the beginning God created")
    assert books[39].startswith("The Gospel According to Saint Matthew\n\n")
    assert books[-1].rstrip().endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert not any(character.isdigit() for book in books for character in book)  # "1:1 " prefixes gone
    assert "\n\nAnd Adam knew Eve his wife" in books[0]  # chapters are separated by a blank line


def test_default_corpus_store_round_trips_and_splits_by_document(kjv, books) -> None:
    eos = kjv.tokenizer.eos_token_id
    train_docs = [kjv.tokenizer.decode(ids) for ids in split_documents(kjv.train_tokens, eos)]
    val_docs = [kjv.tokenizer.decode(ids) for ids in split_documents(kjv.val_tokens, eos)]
    expected_val = [book for index, book in enumerate(books) if is_validation(index, 0.1)]
    assert val_docs == expected_val and len(val_docs) == 7
    assert train_docs == [book for book in books if book not in expected_val]
    assert not set(train_docs) & set(val_docs)
    assert kjv.documents == 66 and kjv.train_documents == 59 and kjv.val_documents == 7
    assert kjv.train_bytes + kjv.val_bytes == sum(len(book.encode()) for book in books) == kjv.bytes
    assert kjv.val_bytes == sum(len(book.encode()) for book in expected_val)
    assert kjv.tokens == len(kjv.train_tokens) + len(kjv.val_tokens)
    assert kjv.bytes_per_token > 2
    meta = json.loads((kjv.store_dir / "meta.json").read_text())
    assert kjv.summary == {  # what run.json records
        "sources": ["builtin:kjv"], "documents": 66, "bytes": meta["bytes"], "tokens": meta["tokens"],
        "bytes_per_token": meta["bytes"] / (meta["tokens"] - 66), "train_documents": 59, "val_documents": 7,
        "train_tokens": meta["train_tokens"], "val_tokens": meta["val_tokens"],
        "train_bytes": kjv.train_bytes, "val_bytes": kjv.val_bytes, "split": "split by document: 7 of 66 held out",
        "vocab_size": 512, "dtype": "uint16",
        "cache_dir": str(kjv.store_dir), "tokenizer_path": str(kjv.tokenizer_path),
        "reused": False, "tokenizer_trained": True}
    json.dumps(kjv.summary)
    assert isinstance(kjv.train_tokens, np.memmap) and kjv.train_tokens.dtype == np.uint16
    assert (kjv.tokenizer_path / "tokenizer.json").is_file()
    assert (kjv.tokenizer_path / "tokenizer_config.json").is_file()


def test_split_is_evenly_spaced_and_exact() -> None:
    for fraction in (0.05, 0.1, 0.25, 0.5):
        for count in (1, 7, 66, 1000):
            chosen = sum(is_validation(index, fraction) for index in range(count))
            assert chosen == int(count * fraction + 0.5)


# --- sources ---------------------------------------------------------------------------------------


def test_parse_source_options(tmp_path) -> None:
    (tmp_path / "a.jsonl").write_text("")
    source = parse_source(f"{tmp_path / 'a.jsonl'}:field=content,limit=3")
    assert source.kind == "file" and source.field_name == "content" and source.limit == 3
    hf = parse_source("hf:roneneldan/TinyStories:split=validation,field=text")
    assert (hf.kind, hf.location, hf.options) == ("hf", "roneneldan/TinyStories",
                                                  {"split": "validation", "field": "text"})
    assert parse_source("hf:roneneldan/TinyStories").options == {}
    with pytest.raises(UserError, match=r"unknown option doc \(options here: field, limit\)"):
        parse_source(f"{tmp_path / 'a.jsonl'}:doc=line")
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(UserError, match=r"unknown option field \(options here: doc, limit\)"):
        parse_source(f"{tmp_path / 'a.txt'}:field=body")
    with pytest.raises(UserError, match="doc must be one of"):
        parse_source(f"{tmp_path}:doc=chapter")
    with pytest.raises(UserError, match="only built-in corpus"):
        parse_source("builtin:shakespeare")


def test_every_source_kind(tmp_path) -> None:
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("Second file.\n")
    (folder / "sub" / "a.md").write_text("Nested markdown.\n")
    (folder / "skip.bin").write_bytes(b"\x00\x01")
    (folder / ".hidden.txt").write_text("hidden")
    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text('{"content": "First record."}\n\n{"content": "Second record.", "id": 2}\n')
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"text": "Object item."}, "String item.", {"text": None}]))
    parquet = tmp_path / "table.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"body": [f"Row {i}." for i in range(10)], "n": list(range(10))}),
                                parquet, row_group_size=3)
    sources = [f"{folder}", f"{jsonl}:field=content", f"{array}", f"{parquet}:field=body,limit=4"]
    assert iter_documents(sources) == [
        "Second file.\n", "Nested markdown.\n", "First record.", "Second record.", "Object item.", "String item.",
        "Row 0.", "Row 1.", "Row 2.", "Row 3."]
    assert iter_documents([f"{folder}:glob=*.md"]) == ["Nested markdown.\n"]


def test_document_modes_for_text(tmp_path) -> None:
    path = tmp_path / "play.txt"
    path.write_text("First speech\nstill first.\n\n\nSecond speech.\n  \nThird.")
    assert iter_documents([str(path)]) == [path.read_text()]
    assert iter_documents([f"{path}:doc=paragraph"]) == [
        "First speech\nstill first.", "Second speech.", "Third."]
    assert iter_documents([f"{path}:doc=line"]) == [
        "First speech", "still first.", "Second speech.", "Third."]


def test_streamed_pieces_tokenize_exactly_like_whole_documents(tmp_path, monkeypatch) -> None:
    """Reading in small pieces and batches (cut at safe newlines) changes no token."""
    lines = sentences(300, seed=1).splitlines(keepends=True)
    # Blank lines and indentation after newlines, where a careless cut would change the tokens.
    text = "".join(line + ("\n \n\n\n" if index % 3 == 0 else "  " if index % 3 == 1 else "")
                   for index, line in enumerate(lines))
    text += "x" * 200 + "\n\u00e9t\u00e9 \u00e0 Montr\u00e9al\n\u00c9t\u00e9\n\u3000wide space\n" + sentences(20)
    (tmp_path / "long.txt").write_text(text)
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": text}) + "\n")
    train_tokenizer([text], vocab_size=400).save_pretrained(tmp_path / "tokenizer")
    monkeypatch.setattr("qwen3.data.sources.PIECE_BYTES", 64)
    monkeypatch.setattr("qwen3.data.store.BATCH_BYTES", 1000)
    prepared = prepare_small([tmp_path / "long.txt", tmp_path / "long.jsonl"], tmp_path / "cache",
                             tmp_path / "tokenizer", val_fraction=0.5)
    expected = prepared.tokenizer.encode(text) + [prepared.tokenizer.eos_token_id]
    assert prepared.train_tokens.tolist() == expected
    assert prepared.val_tokens.tolist() == expected


def test_a_multi_megabyte_single_line_is_read_in_bounded_pieces_and_tokenized_exactly(tmp_path) -> None:
    """A document without a newline is cut before spaces, so memory is bounded by a piece, not by it."""
    rng = np.random.default_rng(3)
    words = WORDS + ["\u00e9t\u00e9", "Montr\u00e9al", "\u0434\u043e\u0431\u0440\u043e", "\u65e5\u672c", "\U0001f680", "3,5"]
    text = " ".join(rng.choice(words, size=400_000))  # about 2 MB on one line
    (tmp_path / "line.txt").write_text(text)
    (tmp_path / "line.jsonl").write_text(json.dumps({"text": text}) + "\n")
    for name in ("line.txt", "line.jsonl"):
        pieces = [piece for piece, _ in iter_pieces([parse_source(str(tmp_path / name))])]
        assert "".join(pieces) == text and len(pieces) > 20
        assert max(len(piece.encode()) for piece in pieces) <= 2 * sources.PIECE_BYTES
    train_tokenizer([text[:100_000]], vocab_size=400).save_pretrained(tmp_path / "tokenizer")
    prepared = prepare_small([tmp_path / "line.txt", tmp_path / "line.jsonl"], tmp_path / "cache",
                             tmp_path / "tokenizer", val_fraction=0.5)
    expected = prepared.tokenizer.encode(text) + [prepared.tokenizer.eos_token_id]
    assert prepared.train_tokens.tolist() == expected
    assert prepared.val_tokens.tolist() == expected


# --- the cache -------------------------------------------------------------------------------------


def test_cache_is_reused_and_rebuilt_when_a_source_changes(tmp_path, tokenizer_dir, capsys) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(10):
        (corpus / f"{index}.txt").write_text(sentences(5, seed=index))
    first = prepare([str(corpus)], tokenizer=str(tokenizer_dir), cache_dir=tmp_path / "cache", progress=False)
    assert not first.reused and first.val_documents == 1
    capsys.readouterr()
    second = prepare([str(corpus)], tokenizer=str(tokenizer_dir), cache_dir=tmp_path / "cache", progress=False)
    assert second.reused and second.store_dir == first.store_dir
    assert "reusing the cached token store" in capsys.readouterr().err
    assert np.array_equal(first.train_tokens, second.train_tokens)

    (corpus / "3.txt").write_text(sentences(6, seed=99))
    third = prepare([str(corpus)], tokenizer=str(tokenizer_dir), cache_dir=tmp_path / "cache", progress=False)
    assert not third.reused and third.store_dir != first.store_dir
    assert len(third.train_tokens) + len(third.val_tokens) != len(first.train_tokens) + len(first.val_tokens)
    # A different split is a different store too.
    other = prepare_small([corpus], tmp_path / "cache", tokenizer_dir, val_fraction=0.3)
    assert not other.reused and other.val_documents == 3


def test_trained_tokenizer_is_cached(tmp_path) -> None:
    (tmp_path / "a.txt").write_text(sentences(30))
    (tmp_path / "b.txt").write_text(sentences(30, seed=1))
    sources = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    first = prepare(sources, vocab_size=300, val_fraction=0.5, cache_dir=tmp_path / "cache", progress=False)
    again = prepare(sources, vocab_size=300, val_fraction=0.5, cache_dir=tmp_path / "cache", progress=False)
    assert first.tokenizer_trained and not again.tokenizer_trained
    assert first.tokenizer.vocab_size == 300 and again.reused


def test_failed_build_leaves_the_cache_intact(tmp_path, tokenizer_dir) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": sentences(2, seed=i)}) + "\n" for i in range(4)))
    cache = tmp_path / "cache"
    built = prepare_small([good], cache, tokenizer_dir, val_fraction=0.5)
    before = {path: path.read_bytes() for path in built.store_dir.rglob("*") if path.is_file()}
    good.write_text(good.read_text() + '{"txt": "typo"}\n')
    with pytest.raises(UserError, match=r"good.jsonl, line 5: no 'text' field \(fields: 'txt'\)"):
        prepare_small([good], cache, tokenizer_dir, val_fraction=0.5)
    assert {path: path.read_bytes() for path in built.store_dir.rglob("*") if path.is_file()} == before
    # No temporary left: only the store (a link to its version folder, as checkpoints are).
    assert not [path.name for path in cache.iterdir() if ".tmp-" in path.name]
    assert [path.name for path in cache.iterdir() if not path.name.startswith(".")] == [built.store_dir.name]


# --- bad input -------------------------------------------------------------------------------------


def test_missing_path(tmp_path) -> None:
    with pytest.raises(UserError, match=f"data source not found: {tmp_path / 'nope.txt'}"):
        prepare([str(tmp_path / "nope.txt")], cache_dir=tmp_path / "cache", progress=False)


def test_empty_corpus(tmp_path) -> None:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(UserError, match="no text found in .*empty.txt, .*blank.txt"):
        prepare([str(tmp_path / "empty.txt"), str(tmp_path / "blank.txt")], cache_dir=tmp_path / "cache",
                progress=False)
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="no files of a supported type in folder"):
        prepare([str(tmp_path / "folder")], cache_dir=tmp_path / "cache", progress=False)
    assert not any((tmp_path / "cache").iterdir())


def test_invalid_utf8_names_file_and_line(tmp_path, tokenizer_dir) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("line one\nline two\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.txt, line 3: invalid UTF-8"):
        prepare_small([path], tmp_path / "cache", tokenizer_dir)
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl, line 2: invalid UTF-8"):
        prepare_small([jsonl], tmp_path / "cache", tokenizer_dir)


def test_bad_json_records(tmp_path, tokenizer_dir) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(UserError, match=r"bad.jsonl, line 2: invalid JSON"):
        prepare_small([path], tmp_path / "cache", tokenizer_dir)
    path.write_text('{"text": ["a", "list"]}\n')
    with pytest.raises(UserError, match=r"bad.jsonl, line 1: field 'text' is a list, not a string"):
        prepare_small([path], tmp_path / "cache", tokenizer_dir)
    table = tmp_path / "t.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"body": ["x"]}), table)
    with pytest.raises(UserError, match=r"t.parquet: no column 'text' \(columns: body\)"):
        prepare_small([table], tmp_path / "cache", tokenizer_dir)


def test_corpus_shorter_than_one_window(tmp_path, tokenizer_dir) -> None:
    for index in range(4):
        (tmp_path / f"{index}.txt").write_text(f"Short document {index}.")
    with pytest.raises(UserError, match=r"training split of .*0.txt, .*3.txt has \d+ tokens \(3 document\(s\)\), shorter than one window of 257"):
        prepare_small([tmp_path / f"{index}.txt" for index in range(4)], tmp_path / "cache", tokenizer_dir,
                      val_fraction=0.25, min_tokens=257)


def decoded_documents(data) -> tuple[list[str], list[str]]:
    eos = data.tokenizer.eos_token_id
    return tuple([data.tokenizer.decode(ids) for ids in split_documents(tokens, eos)]
                 for tokens in (data.train_tokens, data.val_tokens))


def test_one_text_file_of_paragraphs_is_split_by_paragraph(tmp_path, tokenizer_dir, capsys) -> None:
    paragraphs = [sentences(3, seed=index).strip() for index in range(30)]
    notes = tmp_path / "notes.txt"
    notes.write_text("\n\n".join(paragraphs))
    data = prepare_small([notes], tmp_path / "cache", tokenizer_dir)
    train, val = decoded_documents(data)
    assert val == [p for index, p in enumerate(paragraphs) if is_validation(index, 0.1)] and len(val) == 3
    assert train == [p for p in paragraphs if p not in val]
    assert data.split == "split by paragraph: 1 document, too few to split by document; 3 of 30 paragraphs held out"
    assert "notes.txt: split by paragraph" in capsys.readouterr().err  # the prepare line says how
    # Given as one document per paragraph, the same file is split by document, in a store of its own.
    by_option = prepare_small([f"{notes}:doc=paragraph"], tmp_path / "cache", tokenizer_dir)
    assert decoded_documents(by_option) == (train, val) and by_option.split.startswith("split by document")
    assert by_option.store_dir != data.store_dir


def test_a_text_without_enough_paragraphs_holds_out_its_tail_cut_at_a_line_start(tmp_path, tokenizer_dir) -> None:
    lines = sentences(200, seed=1).splitlines(keepends=True)
    poems = [tmp_path / "a.txt", tmp_path / "b.txt"]
    poems[0].write_text("".join(lines[:40]))
    poems[1].write_text("".join(lines[40:]))
    data = prepare_small(poems, tmp_path / "cache", tokenizer_dir)
    train, val = decoded_documents(data)
    assert data.split == ("the last 10% of the text held out: 2 documents of 2 paragraphs, too few to split "
                          "by document or paragraph")
    # b.txt is cut into a training and a held-out document at the line start after 90 % of the text.
    cut = next(index for index in range(len(lines)) if sum(map(len, lines[:index])) >= 0.9 * sum(map(len, lines)))
    assert train == ["".join(lines[:40]), "".join(lines[40:cut])] and val == ["".join(lines[cut:])]
    assert (data.train_documents, data.val_documents) == (2, 1)
    assert data.val_bytes == len("".join(lines[cut:]).encode()) and 0.09 < data.val_bytes / data.bytes < 0.11
    # A larger val_fraction moves the cut, in a store of its own.
    more = prepare_small(poems, tmp_path / "cache", tokenizer_dir, val_fraction=0.05)
    assert more.store_dir != data.store_dir and 0.04 < more.val_bytes / more.bytes < 0.06


def test_datasets_extra_is_optional(tmp_path) -> None:
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match=r"pip install 'qwen3-from-scratch\[datasets\]'"):
            iter_documents(["hf:some/dataset"])
    else:
        pytest.skip("datasets is installed; opening a dataset would reach the network")


# --- windows ---------------------------------------------------------------------------------------


def numbered(count: int) -> np.ndarray:
    return np.arange(count, dtype=np.uint32)


def test_random_windows_shift_by_one_and_stay_in_range() -> None:
    tokens = numbered(1000)
    windows = RandomWindows(tokens, seq_len=16, batch_size=8, seed=0)
    for _ in range(50):
        x, y = next(windows)
        assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.long
        assert torch.equal(y, x + 1)  # consecutive tokens: y is x shifted by one
        assert torch.equal(x[:, 1:], x[:, :-1] + 1)
        assert int(y.max()) <= 999 and int(x.min()) >= 0


def test_random_windows_are_seeded_resumable_and_split_across_ranks() -> None:
    tokens = numbered(5000)
    first = RandomWindows(tokens, 8, 4, seed=1)
    batches = [next(first) for _ in range(3)]
    state = first.state_dict()
    expected = [next(first) for _ in range(2)]

    again = RandomWindows(tokens, 8, 4, seed=1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, (next(again) for _ in range(3))))
    resumed = RandomWindows(tokens, 8, 4, seed=1)
    resumed.load_state_dict(state)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(expected, (next(resumed) for _ in range(2))))
    assert not torch.equal(next(RandomWindows(tokens, 8, 4, seed=2))[0], batches[0][0])

    whole = next(RandomWindows(tokens, 8, 4, seed=3, world_size=1))[0]
    halves = [next(RandomWindows(tokens, 8, 2, seed=3, rank=rank, world_size=2))[0] for rank in range(2)]
    assert torch.equal(torch.cat(halves), whole)


def test_random_windows_need_one_window() -> None:
    with pytest.raises(UserError, match="fewer than one window of 17"):
        RandomWindows(numbered(16), seq_len=16, batch_size=1, seed=0)


@pytest.mark.parametrize("count", [2, 17, 100, 161])
def test_eval_windows_cover_every_token_once(count: int) -> None:
    tokens = numbered(count)
    batches = list(eval_windows(tokens, seq_len=16, batch_size=4))
    inputs = torch.cat([x.flatten() for x, _ in batches])
    targets = torch.cat([y.flatten() for _, y in batches])
    assert targets.tolist() == list(range(1, count))
    assert inputs.tolist() == list(range(0, count - 1))
    assert all(x.shape[1] == 16 for x, _ in batches[:-1] if x.shape[0] > 1)
    full = (count - 1) // 16
    if (count - 1) % 16:  # the shorter last window is a batch of its own
        assert batches[-1][0].shape == (1, (count - 1) % 16)
    assert sum(x.shape[0] for x, _ in batches if x.shape[1] == 16) == full
    assert [x.tolist() for x, _ in eval_windows(tokens, 16, 4)] == [x.tolist() for x, _ in batches]


# --- the command line ------------------------------------------------------------------------------


def test_prepare_command(tmp_path, monkeypatch, capsys, tokenizer_dir) -> None:
    monkeypatch.chdir(tmp_path)
    for index in range(10):
        (tmp_path / f"{index}.txt").write_text(sentences(3, seed=index))
    sources = [argument for index in range(10) for argument in ("--data", f"{index}.txt")]
    main(["prepare", *sources, "--tokenizer", str(tokenizer_dir)])
    output = capsys.readouterr().out
    assert "documents:      10 (9 train, 1 validation)" in output
    assert "built now" in output and "bytes/token:" in output
    main(["prepare", *sources, "--tokenizer", str(tokenizer_dir)])
    assert "reused from the cache" in capsys.readouterr().out
    assert (tmp_path / ".cache" / "qwen3").is_dir()

    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--data", "missing.txt"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "qwen3 prepare: error: data source not found: missing.txt"
    assert os.listdir(tmp_path / ".cache" / "qwen3")
