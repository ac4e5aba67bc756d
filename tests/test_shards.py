"""`scaling prepare --out`: text files tokenised into shards plus a manifest, and the trainer
reading its batches from them by ranges (tests/test_gcs.py does the same through GCS's API)."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer

from launch import config as config_lib
from launch import data, make_shards, shards, train
from launch.cli import main
from scaling.errors import UserError
from scaling.store import Store

WORDS = "the of a to in scaling law loss token model data compute size step".split()


def write_texts(folder, n_files=12, seed=0, words=WORDS):
    """``n_files`` text files of a few thousand words each, named doc-00.txt ..."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        n = int(rng.integers(400, 900))
        (folder / f"doc-{i:02d}.txt").write_text(" ".join(rng.choice(words, n)) + "\n")
    return str(folder / "*.txt")


def prepare(tmp_path, name="corpus", **kwargs):
    kwargs = {"val_fraction": 0.25, "workers": 1, "shard_mb": 0.008, "progress": False} | kwargs
    out = tmp_path / name
    texts = kwargs.pop("texts", None)
    if texts is None:
        texts = write_texts(tmp_path / f"{name}-text")
    return out, make_shards.prepare(texts, kwargs.pop("tokenizer", "bpe:300"), str(out), **kwargs)


def whole_split(out, manifest, split) -> np.ndarray:
    return np.concatenate(
        [np.load(out / s["file"]) for s in manifest["splits"][split]["shards"]]
    ).astype(np.int64)


def test_shards_hold_each_document_tokenised_then_eod_and_the_manifest_counts_them(tmp_path):
    out, manifest = prepare(tmp_path)
    assert (out / shards.MANIFEST).exists()
    tok = Tokenizer.from_file(str(out / shards.TOKENIZER))
    eod = manifest["tokenizer"]["eod_id"]
    assert tok.id_to_token(eod) == manifest["tokenizer"]["eod"] == data.EOD_TEXT
    assert manifest["tokenizer"]["vocab_size"] == tok.get_vocab_size() == 300
    train = manifest["splits"]["train"]
    assert len(train["shards"]) > 1 and manifest["splits"]["val"]["documents"] == 3
    assert train["documents"] + manifest["splits"]["val"]["documents"] == 12
    for split in shards.SPLITS:
        ids = whole_split(out, manifest, split)
        assert len(ids) == manifest["splits"][split]["tokens"]
        assert (ids == eod).sum() == manifest["splits"][split]["documents"]
    # The train stream is each train document's ids and EOD, in name order.
    train_names, _ = data.split_documents([f"doc-{i:02d}.txt" for i in range(12)], 0.25)
    expected = []
    for name in train_names:
        expected += tok.encode((tmp_path / "corpus-text" / name).read_text()).ids + [eod]
    np.testing.assert_array_equal(whole_split(out, manifest, "train"), expected)
    assert shards.fingerprint(manifest) == manifest["fingerprint"]


def test_two_worker_processes_write_the_same_shards_as_one(tmp_path):
    texts = write_texts(tmp_path / "text")
    one = prepare(tmp_path, "one", texts=texts)[1]
    two = prepare(tmp_path, "two", texts=texts, workers=2)[1]
    assert one["fingerprint"] == two["fingerprint"]
    assert one["splits"] == two["splits"]


def test_a_prepared_corpus_is_never_overwritten(tmp_path):
    out, manifest = prepare(tmp_path)
    before = (out / shards.MANIFEST).read_bytes()
    with pytest.raises(UserError, match="already holds a prepared corpus"):
        prepare(tmp_path)
    assert (out / shards.MANIFEST).read_bytes() == before


def test_batches_from_the_shards_equal_batches_from_the_whole_stream(tmp_path):
    out, manifest = prepare(tmp_path)
    corpus = data.prepare_corpus(_data_config(out), 300, progress=False)
    whole = whole_split(out, manifest, "train")
    assert len(corpus.train) == len(whole)
    # Windows across shard boundaries, and at the very end.
    ends = np.cumsum([s["tokens"] for s in manifest["splits"]["train"]["shards"]])
    starts = np.array([0, ends[0] - 5, ends[1] - 1, len(whole) - 33])
    np.testing.assert_array_equal(
        corpus.train.windows(starts, 33), whole[starts[:, None] + np.arange(33)]
    )
    for step in (0, 7, 1000):  # 1000: many epochs in
        for p in range(2):
            np.testing.assert_array_equal(
                data.train_batch(corpus.train, step, 8, 32, 3, p, 2),
                data.train_batch(whole, step, 8, 32, 3, p, 2),
            )
    val = whole_split(out, manifest, "val")
    np.testing.assert_array_equal(
        data.eval_batches(corpus.val, 2, 4, 32), data.eval_batches(val, 2, 4, 32)
    )


def _data_config(out):
    cfg = data.default_data_config()
    cfg.manifest = str(out)
    return cfg


def _damage_shard(out, manifest):
    path = out / manifest["splits"]["train"]["shards"][1]["file"]
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 1  # same size, one bit of one id
    path.write_bytes(bytes(raw))


def _edit_manifest(out, manifest):
    manifest["splits"]["train"]["shards"][0]["tokens"] += 1
    (out / shards.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "damage, model_vocab, message",
    [
        (None, 256, r"its tokenizer has 300 ids but the model's vocab_size is 256; set "),
        (lambda out, m: (out / m["splits"]["val"]["shards"][0]["file"]).unlink(), 300, "missing"),
        (_damage_shard, 300, "fails its checksum"),
        (_edit_manifest, 300, "was edited after it was written"),
        (lambda out, m: (out / shards.TOKENIZER).write_text("{}"), 300, "is not the tokenizer"),
        (lambda out, m: (out / shards.MANIFEST).unlink(), 300, "there is no manifest.json"),
        (lambda out, m: (out / shards.MANIFEST).write_text("[1]"), 300, "not a manifest"),
    ],
)
def test_a_bad_manifest_or_shard_is_refused_in_one_line(tmp_path, damage, model_vocab, message):
    out, manifest = prepare(tmp_path)
    if damage:
        damage(out, manifest)
    with pytest.raises(UserError, match=message) as caught:
        data.prepare_corpus(_data_config(out), model_vocab, progress=False)
    assert "\n" not in str(caught.value)


def test_prepare_on_the_command_line_refuses_bad_input_in_one_line(tmp_path, capsys):
    texts = write_texts(tmp_path / "text")
    out = str(tmp_path / "out")
    for args, message in [
        (["--text", texts, "--out", out], "needs either a study file"),
        (["--text", texts, "--tokenizer", "bpe:9", "--out", out], "at least 257"),
        (
            ["--text", texts, "--tokenizer", str(tmp_path / "text" / "doc-00.txt"), "--out", out],
            "is not a tokenizer.json",
        ),
        (
            ["--text", str(tmp_path / "none/*.txt"), "--tokenizer", "bpe:300", "--out", out],
            "matched no files",
        ),
        (
            ["--text", texts, "--tokenizer", "bpe:300", "--out", out, "--eod", "<nope>"],
            "is not a token of",
        ),
    ]:
        assert main(["prepare", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()  # progress lines, then the error
        errors = [line for line in err if not line.startswith("prepare: ")]
        assert len(errors) == 1 and message in errors[0], err
    assert not (tmp_path / "out" / shards.MANIFEST).exists()


@pytest.mark.slow
def test_a_run_trains_from_a_manifest_and_refuses_another_corpus_at_its_path(
    tiny_config, tmp_path, monkeypatch
):
    out, _ = prepare(tmp_path)
    tiny_config.data.manifest = str(out)
    tiny_config.model.vocab_size = 300
    real_batch = data.train_batch

    def crash_at_15(tokens, step, *args):
        if step == 15:
            raise RuntimeError("simulated crash")
        return real_batch(tokens, step, *args)

    monkeypatch.setattr(data, "train_batch", crash_at_15)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.train_and_evaluate(tiny_config)
    # The corpus at that path is prepared again from other text: the checkpoint's corpus is not it.
    shutil.rmtree(out)
    prepare(tmp_path, texts=write_texts(tmp_path / "other-text", seed=1))
    monkeypatch.setattr(data, "train_batch", real_batch)
    with pytest.raises(UserError, match="trained on different data"):
        train.train_and_evaluate(tiny_config)
    # Started afresh elsewhere, the run trains to the end on the new corpus.
    tiny_config.workdir = str(tmp_path / "fresh")
    tiny_config.store = str(tmp_path / "fresh.sqlite")
    run_id = train.train_and_evaluate(tiny_config)
    assert run_id == config_lib.run_id(tiny_config)
    with Store(tiny_config.store) as store:
        steps, losses = store.scalars(run_id, "eval_loss")
    assert steps[-1] == 20 and losses[-1] < losses[0]


def test_a_bad_file_stops_the_prepare_or_with_skip_bad_files_is_left_out_and_named(tmp_path):
    texts = write_texts(tmp_path / "text")
    (tmp_path / "text" / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.txt is not UTF-8.*--skip-bad-files") as caught:
        prepare(tmp_path, texts=texts)
    assert "\n" not in str(caught.value) and not (tmp_path / "corpus" / shards.MANIFEST).exists()
    _, manifest = prepare(tmp_path, texts=texts, skip_bad_files=True)
    [reason] = manifest["skipped"]
    assert "latin1.txt is not UTF-8" in reason
    documents = sum(manifest["splits"][split]["documents"] for split in shards.SPLITS)
    assert documents == 12  # of 13 files


def test_a_hugging_face_dataset_is_prepared_row_by_row(tmp_path, monkeypatch):
    """A dataset folder of JSON lines through datasets.load_dataset, as a Hub name is once
    downloaded; its rows are the documents. (A worker process gets the source pickled and
    loads the rows again from the cache: that round trip is checked here too.)"""
    datasets = pytest.importorskip("datasets", reason="pip install -e '.[test]'")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))  # worker processes
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    rng = np.random.default_rng(0)
    rows = [" ".join(rng.choice(WORDS, int(rng.integers(300, 600)))) for _ in range(10)]
    folder = tmp_path / "dataset"
    folder.mkdir()
    lines = [{"content": t, "id": i} for i, t in enumerate(rows)] + [{"content": "", "id": 10}]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    options = {"hf_dataset": str(folder), "texts": ""}
    with pytest.raises(UserError, match=r"has no column 'text' \(it has content, id\)"):
        prepare(tmp_path, **options)
    with pytest.raises(UserError, match="row 10 .* has no text in 'content'"):
        prepare(tmp_path, hf_field="content", **options)
    out, manifest = prepare(tmp_path, hf_field="content", skip_bad_files=True, **options)
    assert manifest["source"]["kind"] == "dataset" and len(manifest["skipped"]) == 1
    source = make_shards.HubDataset(str(folder), field="content")
    assert pickle.loads(pickle.dumps(source)).read(3) == rows[3]
    tok = Tokenizer.from_file(str(out / shards.TOKENIZER))
    eod = manifest["tokenizer"]["eod_id"]
    train, val = data.split_documents([f"{i:010d}" for i in range(11)], 0.25)
    for split, names in (("train", train), ("val", val)):
        expected = []
        for name in names:
            if int(name) < 10:
                expected += tok.encode(rows[int(name)]).ids + [eod]
        np.testing.assert_array_equal(whole_split(out, manifest, split), expected)
