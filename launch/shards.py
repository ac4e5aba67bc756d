"""A corpus tokenised once into shards plus a manifest (``launch/make_shards.py`` writes it),
checked and read by every host straight from a folder or a bucket.

    DEST/train-00000.npy ...   1-D token ids, whole documents each followed by the EOD id
    DEST/val-00000.npy ...     the held-out documents (whole documents, chosen by name)
    DEST/tokenizer.json        the tokenizer the ids came from
    DEST/manifest.json         written last: its presence means every shard is complete

A run reads it with ``--config.data.manifest=DEST`` (a folder or ``gs://`` bucket path).

Why ``.npy`` shards rather than grain + ArrayRecord: the trainer samples windows of n_ctx + 1
tokens at any token offset of a concatenated stream (a fresh shift each epoch), not whole
records, so what it needs is a byte range of a flat array. An ``.npy`` shard is exactly that:
a short header, then the ids, so window ``[a, b)`` of a shard is one ranged read of bytes
``offset + 2a .. offset + 2b`` from a local file or a GCS object, with no index, no extra
dependency and nothing to decode. ArrayRecord would store sequences cut at prepare time (fixing
the window boundaries for good) and grain would add worker processes the 2-core machines this
also runs on cannot spare. The loader stays the pure function of (seed, step) it was.

Each shard's MD5 is the manifest's checksum because GCS keeps the MD5 of every object it
stores: a host checks a whole bucket corpus against the manifest from object metadata alone,
before training, without reading a byte of it (a local shard is hashed).
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
import os
from dataclasses import dataclass

import fsspec
import numpy as np
from etils import epath

from launch.corpus import say
from scaling.errors import UserError

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
FORMAT = "scaling-shards/1"
SPLITS = ("train", "val")


def fingerprint(manifest: dict) -> str:
    """16 hex digits over what the ids are: tokenizer, EOD, dtype and every shard's checksum."""
    what = {
        "format": manifest["format"],
        "tokenizer": manifest["tokenizer"]["sha256"],
        "eod_id": manifest["tokenizer"]["eod_id"],
        "dtype": manifest["dtype"],
        "splits": {
            split: [[s["file"], s["tokens"], s["md5"]] for s in manifest["splits"][split]["shards"]]
            for split in SPLITS
        },
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def manifest_path(location: str) -> epath.Path:
    """The manifest.json that ``data.manifest`` names: its folder, or the file itself."""
    path = epath.Path(location)
    return path if path.name == MANIFEST else path / MANIFEST


@dataclass(frozen=True, eq=False)
class Manifest:
    """A prepared corpus, checked: its folder, its JSON, and the tokenizer file it holds."""

    root: epath.Path
    data: dict
    tokenizer_json: str

    @property
    def fingerprint(self) -> str:
        return self.data["fingerprint"]

    def stream(self, split: str, read_threads: int = 16) -> ShardedStream:
        entry = self.data["splits"][split]
        return ShardedStream(self.root, entry["shards"], np.dtype(self.data["dtype"]), read_threads)


def open_manifest(location: str, model_vocab: int, progress: bool = True) -> Manifest:
    """The manifest at ``location`` (its folder or the file), refused in one line before any
    training if it is unreadable, its tokenizer has more ids than the model, or any shard is
    missing or fails its checksum."""
    key = "data.manifest"
    path = manifest_path(location)
    root = path.parent
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(
            f"{key}={location}: there is no {MANIFEST} there; prepare the corpus first "
            f"with `scaling prepare --text GLOBS --tokenizer TOKENIZER --out {root}`"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{key}={location}: {path} is not JSON ({e}); prepare it again") from None
    except OSError as e:
        raise UserError(f"{key}={location}: cannot read {path} ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(
            f"{key}={location}: {path} is not a manifest of format {FORMAT}; give the "
            "folder `scaling prepare --out` wrote"
        )
    try:
        if fingerprint(data) != data["fingerprint"]:
            raise UserError(
                f"{key}={location}: {path} was edited after it was written (its fingerprint no "
                "longer matches its shards); prepare the corpus again"
            )
        vocab = int(data["tokenizer"]["vocab_size"])
        tok_sha = data["tokenizer"]["sha256"]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{key}={location}: {path} lacks {e}; prepare the corpus again") from None
    if vocab > model_vocab:
        raise UserError(
            f"{key}={location}: its tokenizer has {vocab} ids but the model's vocab_size is "
            f"{model_vocab}; set --config.model.vocab_size={vocab} (or more)"
        )
    try:
        tokenizer_json = (root / data["tokenizer"]["file"]).read_text()
    except OSError:
        raise UserError(
            f"{key}={location}: its tokenizer file {root / TOKENIZER} is missing; prepare the "
            "corpus again"
        ) from None
    if hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest() != tok_sha:
        raise UserError(
            f"{key}={location}: {root / TOKENIZER} is not the tokenizer the shards were made "
            "with (its SHA-256 differs from the manifest's); prepare the corpus again"
        )
    shards = [s for split in SPLITS for s in data["splits"][split]["shards"]]
    say(progress, f"checking {len(shards)} shards of {root} against {MANIFEST}")
    for shard in shards:
        problem = _shard_problem(root / shard["file"], shard)
        if problem:
            raise UserError(
                f"{key}={location}: shard {shard['file']} {problem}; copy it again from where "
                "the corpus was prepared, or prepare the corpus again"
            )
    return Manifest(root, data, tokenizer_json)


def _shard_problem(path: epath.Path, shard: dict) -> str:
    """What is wrong with one shard ("" if nothing): missing, wrong size or wrong MD5. A GCS
    object's own MD5 is compared without reading it."""
    if str(path).startswith("gs://"):
        try:
            info = _gcs().info(str(path))
        except FileNotFoundError:
            return "is missing"
        size, md5 = int(info["size"]), info.get("md5Hash")
        if size != shard["size"]:
            return f"has {size} bytes, not the manifest's {shard['size']}"
        if md5:
            found = base64.b64decode(md5).hex()
        else:  # a composite object has no MD5: read it
            found = hashlib.md5(path.read_bytes()).hexdigest()
    else:
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            return "is missing"
        if size != shard["size"]:
            return f"has {size} bytes, not the manifest's {shard['size']}"
        with open(path, "rb") as f:
            found = hashlib.file_digest(f, "md5").hexdigest()
    if found != shard["md5"]:
        return f"fails its checksum (MD5 {found}, the manifest says {shard['md5']})"
    return ""


def _gcs():
    """The gcsfs filesystem etils uses too (one per process; it honours
    STORAGE_EMULATOR_HOST, and its calls may come from several threads)."""
    return fsspec.filesystem("gs")


class ShardedStream:
    """One split of a manifest as one 1-D token stream (its shards end to end), read by ranges:
    only the windows asked for are read, from memory-mapped files or by ranged GCS reads, so a
    host's memory is bounded by its batches, not by the corpus."""

    def __init__(
        self, root: epath.Path, shards: list[dict], dtype: np.dtype, read_threads: int = 16
    ):
        self.root, self.shards, self.dtype = root, shards, dtype
        self.read_threads = read_threads  # concurrent ranged reads from a bucket
        self.ends = np.cumsum([s["tokens"] for s in shards])
        self.starts = self.ends - [s["tokens"] for s in shards]
        self.remote = str(root).startswith("gs://")
        self._maps: dict[int, np.ndarray] = {}
        self._pool = None

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """int32 ``[len(starts), length]``: row i is tokens ``[starts[i], starts[i] + length)``."""
        pieces = [self._pieces(int(a), int(a) + length) for a in starts]
        if self.remote:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.read_threads)
            flat = [p for row in pieces for p in row]
            read = dict(zip(flat, self._pool.map(self._read, flat), strict=True))
        else:
            read = {p: self._read(p) for row in pieces for p in row}
        out = np.empty((len(starts), length), np.int32)
        for i, row in enumerate(pieces):
            out[i] = np.concatenate([read[p] for p in row])
        return out

    def _pieces(self, a: int, b: int) -> list[tuple[int, int, int]]:
        """(shard, first, end) ranges within shards covering stream tokens [a, b)."""
        if not 0 <= a < b <= len(self):
            raise IndexError(f"tokens [{a}, {b}) outside a stream of {len(self)}")
        pieces = []
        shard = int(np.searchsorted(self.ends, a, side="right"))
        while a < b:
            end = min(b, int(self.ends[shard]))
            pieces.append((shard, a - int(self.starts[shard]), end - int(self.starts[shard])))
            a, shard = end, shard + 1
        return pieces

    def _read(self, piece: tuple[int, int, int]) -> np.ndarray:
        shard, first, end = piece
        entry = self.shards[shard]
        if not self.remote:
            ids = self._maps.get(shard)
            if ids is None:
                ids = self._maps[shard] = np.load(self.root / entry["file"], mmap_mode="r")
            return ids[first:end]
        size = self.dtype.itemsize
        offset = entry["data_offset"]
        raw = _gcs().cat_file(
            str(self.root / entry["file"]), start=offset + first * size, end=offset + end * size
        )
        return np.frombuffer(raw, self.dtype)
