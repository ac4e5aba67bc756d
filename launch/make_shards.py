"""``scaling prepare --text GLOBS | --hf-dataset NAME --tokenizer T --out DEST``: tokenise a
corpus once into the shards plus manifest that ``launch/shards.py`` describes and reads.

Documents come from files (one per file) or a Hugging Face dataset (one per row), and are held
out by name as everywhere else (``launch.corpus.split_documents``). Worker processes, one per
core, each tokenise one shard and write it whole to the folder or bucket; the manifest is
written last, from what they report.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import hashlib
import io
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from etils import epath
from tokenizers import Tokenizer as HFTokenizer
from tqdm import tqdm

from launch.bpe import EOD_TEXT, train_bpe
from launch.corpus import atomic_write, read_text_file, split_documents, text_files
from launch.shards import FORMAT, MANIFEST, SPLITS, TOKENIZER, fingerprint
from scaling.errors import UserError, first_line

# End-of-document tokens of common tokenizers (GPT-2, the suite's BPE, Llama 3, SentencePiece).
EOD_CANDIDATES = ("<|endoftext|>", "<|eod|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
# Documents, and characters of text, encoded per call: bound the memory the tokenizer's
# encodings hold at once (hundreds of bytes a token, so one huge file alone can take gigabytes).
ENCODE_GROUP, ENCODE_CHARS = 64, 4_000_000


@dataclass(frozen=True)
class Tokenizer:
    """A tokenizer as the manifest records it, and its JSON (what workers rebuild it from)."""

    json_text: str
    vocab_size: int
    eod_id: int
    eod: str
    source: str  # what --tokenizer named

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.json_text.encode("utf-8")).hexdigest()

    @property
    def dtype(self) -> str:
        return "uint16" if self.vocab_size <= 1 << 16 else "uint32"


def load_tokenizer(
    spec: str, eod: str = "", train_texts=None, progress: bool = False, sample_mb: float = 0
) -> Tokenizer:
    """The tokenizer ``spec`` names: a ``tokenizer.json`` of the tokenizers library, ``bpe:V``
    (the suite's byte-level BPE with V ids, trained on ``train_texts()``), or a Hugging Face
    name (needs the network). Its end-of-document token is ``eod``, else the first of
    ``EOD_CANDIDATES`` it has."""
    if spec.startswith("bpe:"):
        try:
            vocab = int(spec[4:])
        except ValueError:
            vocab = 0
        if vocab < 257:
            raise UserError(
                f"--tokenizer {spec!r}: give the BPE's vocabulary size after 'bpe:', at least "
                "257 (256 bytes and <|eod|>), e.g. bpe:32768"
            )
        _say(progress, f"training a {vocab}-id BPE on up to {sample_mb:g} MB of the train text")
        hf = train_bpe(train_texts(), vocab)
        eod = eod or EOD_TEXT
    elif os.path.isfile(os.path.expanduser(spec)):
        try:
            hf = HFTokenizer.from_file(os.path.expanduser(spec))
        except Exception as e:  # the tokenizers library raises a bare Exception
            raise UserError(
                f"--tokenizer {spec} is not a tokenizer.json the tokenizers library reads "
                f"({first_line(e, 120)}); give the tokenizer.json of a tokenizers "
                "tokenizer"
            ) from None
    else:
        try:
            hf = HFTokenizer.from_pretrained(spec)
        except Exception as e:
            raise UserError(
                f"--tokenizer {spec!r} is not a file, and fetching it from the Hugging Face Hub "
                f"failed ({first_line(e, 120)}); give a path to a tokenizer.json, "
                "bpe:VOCAB to train one, or a Hub name while online"
            ) from None
    if not eod:
        eod = next((t for t in EOD_CANDIDATES if hf.token_to_id(t) is not None), "")
        if not eod:
            raise UserError(
                f"--tokenizer {spec} has none of the usual end-of-document tokens "
                f"({', '.join(EOD_CANDIDATES)}); name its token with --eod"
            )
    eod_id = hf.token_to_id(eod)
    if eod_id is None:
        raise UserError(f"--eod {eod!r} is not a token of --tokenizer {spec}; name one it has")
    return Tokenizer(hf.to_str(), hf.get_vocab_size(), eod_id, eod, spec)


class TextFiles:
    """Documents from files: one per file matched by the globs ``text``, named by path."""

    kind = "files"

    def __init__(self, text: str):
        self.described = text
        self._paths = dict(text_files(text, key="--text"))

    def names(self) -> list[str]:
        return list(self._paths)

    def size(self, name: str) -> int:
        return os.path.getsize(self._paths[name])

    def ref(self, name: str):
        return self._paths[name]

    def read(self, ref) -> str:
        return read_text_file(ref)


class HubDataset:
    """Documents from a Hugging Face dataset (``datasets.load_dataset(name, config, split)``,
    which downloads it once into its cache, or reads a local dataset folder): one per row,
    its text in ``field``, named by row number. Sizes are the mean of the first rows'."""

    kind = "dataset"

    def __init__(self, name: str, split: str = "train", field: str = "text"):
        self.spec, self.split, self.field = name, split, field
        self.described = f"{name} (split {split}, field {field})"
        self._rows = self._load()
        if field not in self._rows.column_names:
            raise UserError(
                f"--hf-dataset {name}: split {split!r} has no column {field!r} (it has "
                f"{', '.join(self._rows.column_names)}); name the text column with --hf-field"
            )
        first = self._rows[: min(1000, len(self._rows))][field]
        self._mean = max(1, sum(len(t or "") for t in first) // max(1, len(first)))

    def _load(self):
        try:
            import datasets  # an optional extra ([hf]): imported only when asked for
        except ImportError:
            raise UserError(
                "--hf-dataset needs the datasets library: pip install datasets"
            ) from None
        name, _, config = self.spec.partition(":")
        try:
            return datasets.load_dataset(name, config or None, split=self.split)
        except Exception as e:  # the Hub, the network, a wrong name: all end up here
            raise UserError(
                f"--hf-dataset {self.spec}: loading split {self.split!r} failed "
                f"({first_line(e, 120)}); check the name (NAME or NAME:CONFIG) and the network"
            ) from None

    def __getstate__(self):  # worker processes load the rows again, from the cache
        return {k: v for k, v in self.__dict__.items() if k != "_rows"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._rows = self._load()

    def names(self) -> list[str]:
        return [f"{i:010d}" for i in range(len(self._rows))]

    def size(self, name: str) -> int:
        return self._mean

    def ref(self, name: str):
        return int(name)

    def read(self, ref) -> str:
        text = self._rows[ref][self.field]
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"row {ref} of {self.spec} has no text in {self.field!r}")
        return text


def prepare(
    text: str,
    tokenizer: str,
    out: str,
    val_fraction: float = 0.01,
    workers: int = 0,
    shard_mb: float = 256.0,
    eod: str = "",
    tokenizer_sample_mb: float = 200.0,
    skip_bad_files: bool = False,
    progress: bool = True,
    hf_dataset: str = "",
    hf_split: str = "train",
    hf_field: str = "text",
) -> dict:
    """Tokenise the files matched by ``text`` (or the rows of ``hf_dataset``) into shards plus a
    manifest at ``out`` (a folder or gs:// path) and return the manifest. ``workers`` processes
    (0: one per core) tokenise one shard of about ``shard_mb`` MB of text each; the manifest
    is written last."""
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction {val_fraction} must be strictly between 0 and 1")
    if not shard_mb > 0:
        raise UserError(f"--shard-mb {shard_mb} must be positive, e.g. 256")
    dest = epath.Path(out)
    if (dest / MANIFEST).exists():
        raise UserError(
            f"{out} already holds a prepared corpus ({MANIFEST}); give a new --out, or delete "
            "that folder first to prepare it again"
        )
    if bool(text) == bool(hf_dataset):
        raise UserError("give either --text GLOBS or --hf-dataset NAME, one of the two")
    source = TextFiles(text) if text else HubDataset(hf_dataset, hf_split, hf_field)
    train_names, val_names = split_documents(source.names(), val_fraction)
    sizes = {name: source.size(name) for name in (*train_names, *val_names)}
    started = time.perf_counter()

    def sample_texts():  # the BPE's training text: train documents only, up to the sample size
        budget = tokenizer_sample_mb * 1e6
        for name in train_names:
            if budget <= 0:
                return
            budget -= sizes[name]
            try:
                yield source.read(source.ref(name))
            except UserError:
                continue  # a bad document is refused (or left out) when it is tokenised

    tok = load_tokenizer(tokenizer, eod, sample_texts, progress, tokenizer_sample_mb)
    tokenise_started = time.perf_counter()
    dest.mkdir(parents=True, exist_ok=True)
    tasks = []
    for split, split_names in (("train", train_names), ("val", val_names)):
        for i, group in enumerate(_groups(split_names, sizes, shard_mb * 1e6)):
            refs = [source.ref(n) for n in group]
            tasks.append(_Task(split, f"{split}-{i:05d}.npy", refs, sum(sizes[n] for n in group)))
    workers = workers or os.cpu_count() or 1
    total_bytes = sum(sizes.values())
    _say(
        progress,
        f"tokenising {len(train_names)} train and {len(val_names)} val documents "
        f"({total_bytes / 1e6:,.1f} MB) into {len(tasks)} shards with {workers} process(es)",
    )
    shards = _run_tasks(
        tasks, tok, source, str(dest), skip_bad_files, workers, total_bytes, progress
    )
    skipped = sorted(reason for s in shards for reason in s.pop("skipped"))
    seconds = time.perf_counter() - tokenise_started  # the tokenizer's training not counted
    splits = {}
    for split in SPLITS:
        mine = [(task, s) for task, s in zip(tasks, shards, strict=True) if task.split == split]
        splits[split] = {
            "tokens": sum(s["tokens"] for _, s in mine),
            "documents": sum(s["documents"] for _, s in mine),
            "text_bytes": sum(task.text_bytes for task, _ in mine),
            "shards": [s for _, s in mine],
        }
    manifest = {
        "format": FORMAT,
        "tokenizer": {
            "file": TOKENIZER,
            "sha256": tok.sha256,
            "vocab_size": tok.vocab_size,
            "eod_id": tok.eod_id,
            "eod": tok.eod,
            "source": tok.source,
        },
        "dtype": tok.dtype,
        "val_fraction": val_fraction,
        "source": {"kind": source.kind, "what": source.described},
        "skipped": skipped,  # files left out (--skip-bad-files), each with its reason
        "splits": splits,
        "prepare": {
            "tokenise_seconds": round(seconds, 2),
            "tokenizer_seconds": round(tokenise_started - started, 2),
            "workers": workers,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        },
    }
    manifest["fingerprint"] = fingerprint(manifest)
    (dest / TOKENIZER).write_text(tok.json_text)
    atomic_write(dest / MANIFEST, json.dumps(manifest, indent=1).encode("utf-8"))
    tokens = splits["train"]["tokens"] + splits["val"]["tokens"]
    _say(
        progress,
        f"{tokens:,} tokens (train {splits['train']['tokens']:,}, val {splits['val']['tokens']:,})"
        f" in {seconds:.1f} s: {tokens / seconds:,.0f} tokens/s, "
        f"{tokens / seconds / workers:,.0f} per process; "
        + (f"{len(skipped)} bad files left out (listed in it); " if skipped else "")
        + f"manifest {dest / MANIFEST}, "
        f"fingerprint {manifest['fingerprint']}",
    )
    return manifest


class _Task(NamedTuple):
    """One shard to make: its split, file name, documents (refs of the source), text size."""

    split: str
    file: str
    refs: list
    text_bytes: int


def _groups(names, sizes: dict, target: float) -> list[list[str]]:
    """Consecutive names in groups of about ``target`` bytes of text (at least one each)."""
    groups, current, size = [], [], 0
    for name in names:
        current.append(name)
        size += sizes[name]
        if size >= target:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    return groups


def _run_tasks(tasks, tok: Tokenizer, source, dest: str, skip_bad: bool, workers, total, progress):
    """Every shard tokenised and written, in the tasks' order; a progress bar over text bytes."""
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="tokenising",
        file=sys.stderr,
        disable=not progress,
    )
    results = [None] * len(tasks)
    try:
        if workers == 1:
            for i, task in enumerate(tasks):
                results[i] = _tokenise_shard(tok, source, dest, skip_bad, task.file, task.refs)
                bar.update(task.text_bytes)
        else:
            context = multiprocessing.get_context("spawn")  # gcsfs and threads do not fork well
            with concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=context, initializer=_one_thread_each
            ) as pool:
                futures = {
                    pool.submit(_tokenise_shard, tok, source, dest, skip_bad, t.file, t.refs): i
                    for i, t in enumerate(tasks)
                }
                for future in concurrent.futures.as_completed(futures):
                    i = futures[future]
                    results[i] = future.result()
                    bar.update(tasks[i].text_bytes)
    finally:
        bar.close()
    return results


def _one_thread_each():
    # One tokenizer thread per worker process: the processes already use every core.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"


_WORKER_TOKENIZER: dict[str, object] = {}


def _tokenise_shard(tok: Tokenizer, source, dest: str, skip_bad: bool, file: str, refs):
    """Tokenise the documents ``refs`` of ``source`` (each followed by EOD) into the shard
    ``dest/file``; its entry. A document that is empty or not UTF-8 stops the prepare, or with
    ``skip_bad`` is left out and named."""
    hf = _WORKER_TOKENIZER.get(tok.sha256)
    if hf is None:
        hf = _WORKER_TOKENIZER[tok.sha256] = HFTokenizer.from_str(tok.json_text)
    dtype, eod = np.dtype(tok.dtype), np.array([tok.eod_id], tok.dtype)
    parts, skipped, texts = [], [], []

    def encode():
        for encoding in hf.encode_batch_fast(texts, add_special_tokens=False):
            parts.extend([np.asarray(encoding.ids, dtype), eod])
        texts.clear()

    for ref in refs:
        try:
            texts.append(source.read(ref))
        except UserError as e:
            if not skip_bad:
                raise UserError(f"{e} (or pass --skip-bad-files)") from None
            skipped.append(str(e).split(";")[0])
            continue
        if len(texts) == ENCODE_GROUP or sum(map(len, texts)) >= ENCODE_CHARS:
            encode()
    encode()
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype)
    buffer = io.BytesIO()
    np.save(buffer, ids, allow_pickle=False)
    raw = buffer.getvalue()
    atomic_write(epath.Path(dest) / file, raw)
    return {
        "file": file,
        "tokens": len(ids),
        "documents": len(refs) - len(skipped),
        "skipped": skipped,
        "data_offset": len(raw) - ids.nbytes,
        "size": len(raw),
        "md5": hashlib.md5(raw).hexdigest(),
    }


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"prepare: {message}", file=sys.stderr, flush=True)
