"""Corpora (text, Markdown, JSON lines, directories, the built-in one) and contexts."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import torch

from kronscope.lm import Corpus, CorpusError, SubjectModel, load_corpus, make_contexts

DOCS = [
    "the cat sat on the mat",
    "A sparse autoencoder reads the residual stream of a language model.",
    "def add(a, b):\n    return a + b",
    "the dog sat on the log and the cat sat on the mat",
    "Numbers like 3.14, 42 and 1e-5 appear in text too!",
] * 6


def write_txt(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture()
def corpus(tmp_path: Path) -> Corpus:
    return load_corpus(write_txt(tmp_path / "docs.txt", DOCS))


# -- loading ------------------------------------------------------------------------------


def test_txt_documents_split_on_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("first line\nsame doc\n\n  \n\nsecond\r\n\r\nthird  \n", encoding="utf-8")
    c = load_corpus(path)
    assert list(c.iter_documents()) == ["first line\nsame doc", "second", "third"]
    assert (c.name, c.n_documents, c.n_chars) == ("a.txt", 3, len("first line\nsame doc") + 6 + 5)
    assert list(c.iter_documents()) == list(c.iter_documents())  # readable again
    one = tmp_path / "one.txt"
    one.write_text("no blank\nlines here\n", encoding="utf-8")
    assert load_corpus(str(one)).n_documents == 1


def test_markdown_is_one_document(tmp_path: Path) -> None:
    path = tmp_path / "a.md"
    path.write_text("# Title\n\nA paragraph.\n\n```\ncode\n```\n", encoding="utf-8")
    assert list(load_corpus(path).iter_documents()) == ["# Title\n\nA paragraph.\n\n```\ncode\n```"]


def test_jsonl_field_and_gzip(tmp_path: Path) -> None:
    records = [{"body": "one", "id": 1}, {"body": "two"}, {"body": ""}, {"body": "three"}]
    plain = write_jsonl(tmp_path / "d.jsonl", records)
    c = load_corpus(f"{plain}:body")
    assert list(c.iter_documents()) == ["one", "two", "three"]
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    cz = load_corpus(f"{gz}:body")
    assert list(cz.iter_documents()) == ["one", "two", "three"] and cz.sha256 == c.sha256
    default = write_jsonl(tmp_path / "t.jsonl", [{"text": "x y"}])
    assert list(load_corpus(default).iter_documents()) == ["x y"]


def test_directory_sorted_recursive_no_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    (root / "b").mkdir(parents=True)
    (root / ".git").mkdir()
    write_txt(root / "b" / "z.txt", ["b/z"])
    write_txt(root / "a.txt", ["a1", "a2"])
    (root / "c.md").write_text("c md\n\nstill c", encoding="utf-8")
    write_jsonl(root / "b" / "y.jsonl", [{"text": "b/y"}])
    write_txt(root / ".git" / "x.txt", ["hidden"])
    write_txt(root / "skip.csv", ["not a corpus file"])
    outside = write_txt(tmp_path / "outside.txt", ["outside"])
    os.symlink(outside, root / "link.txt")
    os.symlink(tmp_path, root / "loop", target_is_directory=True)
    c = load_corpus(root)
    assert list(c.iter_documents()) == ["a1", "a2", "b/y", "b/z", "c md\n\nstill c"]
    assert c.description.startswith("4 files")


def test_sha_identifies_documents(tmp_path: Path) -> None:
    a = load_corpus(write_txt(tmp_path / "a.txt", ["ab", "c"]))
    b = load_corpus(write_txt(tmp_path / "b.txt", ["a", "bc"]))
    again = load_corpus(write_txt(tmp_path / "c.txt", ["ab", "c"]))
    assert a.sha256 != b.sha256 and a.sha256 == again.sha256 and len(a.sha256) == 64


def test_builtin_corpus() -> None:
    from kronscope.lm.pydoc_corpus import builtin_documents

    c = load_corpus("builtin")
    assert 1_000_000 <= c.n_chars <= 2_000_000
    assert c.n_documents > 50
    assert c.name == "builtin" and load_corpus("pydoc").sha256 == c.sha256
    builtin_documents.cache_clear()  # rebuilt from scratch: identical
    assert load_corpus("builtin").sha256 == c.sha256
    first = next(c.iter_documents())
    assert isinstance(first, str) and first


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["", "\n\n   \n\t\n"])
def test_empty_corpus(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(CorpusError, match=r"'empty\.txt'.*empty"):
        load_corpus(path)


def test_empty_directory_and_missing_path(tmp_path: Path) -> None:
    (tmp_path / "nothing").mkdir()
    with pytest.raises(CorpusError, match="nothing has no"):
        load_corpus(tmp_path / "nothing")
    with pytest.raises(CorpusError, match=r"missing\.txt'.*no such file"):
        load_corpus(str(tmp_path / "missing.txt"))


def test_malformed_jsonl_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "fine"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(CorpusError) as info:
        load_corpus(path)
    assert str(path) in str(info.value) and "line 4" in str(info.value)


@pytest.mark.parametrize(
    ("line", "expect"),
    [
        ('{"body": "x"}', "no field 'text'"),
        ('{"text": 3}', "not a string"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_jsonl_records_must_have_the_field(tmp_path: Path, line: str, expect: str) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=expect) as info:
        load_corpus(path)
    assert "line 1" in str(info.value)


def test_unreadable_files(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin1\.txt is not UTF-8"):
        load_corpus(bad)
    gz = tmp_path / "trunc.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"text": "x"}\n' * 100)[:30])
    with pytest.raises(CorpusError, match=r"trunc\.jsonl\.gz"):
        load_corpus(gz)
    other = tmp_path / "data.csv"
    other.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"data\.csv is not a supported kind"):
        load_corpus(other)


# -- contexts -----------------------------------------------------------------------------


def test_contexts_windows_and_bos(corpus: Corpus, tiny_gpt2: SubjectModel) -> None:
    ctx = make_contexts(corpus, tiny_gpt2, 16, seed=0)
    bos = tiny_gpt2.tokenizer.bos_token_id
    assert ctx.input_ids.shape[1] == 16 and len(ctx) > 10
    assert ctx.input_ids.dtype == torch.int64
    assert (ctx.input_ids[:, 0] == bos).all()
    assert ctx.attention_mask.eq(1).all()
    assert torch.equal(ctx.special_mask, ctx.input_ids == bos)  # BOS = EOS = separator in GPT-2
    assert ctx.special_mask[:, 0].all() and ctx.special_mask[:, 1:].any()  # separators


def test_contexts_are_the_token_stream(corpus: Corpus, tiny_gpt2: SubjectModel) -> None:
    ctx = make_contexts(corpus, tiny_gpt2, 16, shuffle=False)
    tok = tiny_gpt2.tokenizer
    stream: list[int] = []
    for doc in corpus.iter_documents():
        if stream:
            stream.append(tok.eos_token_id)
        stream.extend(tok(doc, add_special_tokens=False)["input_ids"])
    n = len(stream) // 15
    assert len(ctx) == n and ctx.n_corpus_tokens == len(stream)
    assert ctx.input_ids[:, 1:].reshape(-1).tolist() == stream[: n * 15]


def test_contexts_deterministic_for_a_seed(corpus: Corpus, tiny_llama: SubjectModel) -> None:
    a = make_contexts(corpus, tiny_llama, 12, seed=3)
    b = make_contexts(corpus, tiny_llama, 12, seed=3)
    c = make_contexts(corpus, tiny_llama, 12, seed=4)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.special_mask, b.special_mask)
    assert not torch.equal(a.input_ids, c.input_ids)
    rows = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert rows(a.input_ids) == rows(c.input_ids)  # the same windows, another order
    assert make_contexts(corpus, tiny_llama, 12, seed=3, max_contexts=5).input_ids.equal(
        a.input_ids[:5]
    )


def test_contexts_without_bos(corpus: Corpus, tiny_llama: SubjectModel) -> None:
    ctx = make_contexts(corpus, tiny_llama, 12, prepend_bos=False, shuffle=False)
    first_doc = tiny_llama.tokenizer(DOCS[0], add_special_tokens=False)["input_ids"]
    assert ctx.input_ids[0, : len(first_doc)].tolist() == first_doc
    eos = tiny_llama.tokenizer.eos_token_id
    assert torch.equal(ctx.special_mask, ctx.input_ids == eos)


def test_contexts_bert_framing(corpus: Corpus, tiny_bert: SubjectModel) -> None:
    ctx = make_contexts(corpus, tiny_bert, 10)
    tok = tiny_bert.tokenizer
    assert ctx.input_ids.shape[1] == 10
    assert (ctx.input_ids[:, 0] == tok.cls_token_id).all() and (
        ctx.input_ids[:, -1] == tok.sep_token_id
    ).all()
    assert ctx.special_mask[:, 0].all() and ctx.special_mask[:, -1].all()


def test_contexts_batches(corpus: Corpus, tiny_gpt2: SubjectModel) -> None:
    ctx = make_contexts(corpus, tiny_gpt2, 16, max_contexts=7)
    assert len(ctx) == 7
    got = list(ctx.batches(3))
    assert [s for s, *_ in got] == [0, 3, 6]
    assert torch.equal(torch.cat([ids for _, ids, _, _ in got]), ctx.input_ids)
    assert all(m.shape == ids.shape == sm.shape for _, ids, m, sm in got)


def test_builtin_contexts_stop_early(tiny_gpt2: SubjectModel) -> None:
    ctx = make_contexts(load_corpus("builtin"), tiny_gpt2, 64, max_contexts=4, shuffle=False)
    assert ctx.input_ids.shape == (4, 64)
    assert ctx.n_corpus_tokens < 100_000  # did not tokenise the whole corpus


def test_ctx_len_beyond_model(corpus: Corpus, tiny_gpt2: SubjectModel) -> None:
    with pytest.raises(CorpusError, match=r"ctx_len 65 .*'tiny-gpt2' allows \(64 positions\)"):
        make_contexts(corpus, tiny_gpt2, 65)


def test_too_few_tokens(tmp_path: Path, tiny_gpt2: SubjectModel) -> None:
    small = load_corpus(write_txt(tmp_path / "small.txt", ["hi"]))
    with pytest.raises(
        CorpusError, match=r"'small\.txt' gives \d+ tokens .*fewer than one context"
    ):
        make_contexts(small, tiny_gpt2, 32)
    with pytest.raises(CorpusError, match="leaves no room"):
        make_contexts(small, tiny_gpt2, 1)
