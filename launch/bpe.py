"""The suite's byte-level BPE: trained on a corpus's training text, with ``<|eod|>`` as id 0.

Used by the cached data path (``data.tokenizer=bpe``) and by ``scaling prepare --tokenizer
bpe:VOCAB``; both then read it back as a ``tokenizer.json``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOD_TEXT = "<|eod|>"  # the end-of-document token, and how it reads in decoded text


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of ``vocab_size`` ids learned from ``texts``; ``EOD_TEXT`` is id 0."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TEXT],  # listed first, so it gets id 0
        # All 256 byte symbols, so any text encodes, even characters the corpus lacks.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    assert bpe.token_to_id(EOD_TEXT) == 0
    return bpe


@functools.lru_cache(maxsize=4)
def load_bpe(path: str) -> Tokenizer:
    """The tokenizer in the ``tokenizer.json`` at ``path`` (cached: encode and decode reuse it)."""
    return Tokenizer.from_file(path)
