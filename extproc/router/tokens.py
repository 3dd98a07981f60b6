"""Fast, exact WordPiece ids for the router, with a head+tail truncation policy.

The Hugging Face ``tokenizers`` pipeline costs about 1 ms for a 512-token prompt on one core,
more than the whole router budget. BERT pre-tokenisation never lets a token cross whitespace,
so the prompt is split with ``str.split()`` (C speed) and each word is looked up in a
word -> ids cache that holds the ids as packed int64 bytes: a prompt's ids are one
``b"".join(map(cache.__getitem__, words))`` and one ``np.frombuffer``, with no Python loop
and no per-id Python objects. Only unseen words go through ``tokenizers`` (which applies the
full normaliser: lower-casing, accent stripping, punctuation, CJK and Unicode splitting).

``str.split()`` also splits on seven characters that BERT's normaliser deletes instead
(``\\v \\f \\x1c-\\x1f \\x85``, so ``a\\vb`` is one word for BERT); those are deleted first.
The ids are identical to ``tokenizers``' own (checked in the unit tests); the cache is bounded.

Truncation: a prompt longer than ``max_tokens`` keeps its first ``head`` and its last ``tail``
tokens: instructions tend to sit at the start and the actual question at the end of long
prompts. Text beyond ``CHARS_PER_TOKEN_CAP * max_tokens`` characters is cut (head and tail
in the same proportion) before tokenising, so cost stays bounded for huge prompts.
"""

from __future__ import annotations

from array import array
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

CHARS_PER_TOKEN_CAP = 16
CLS_ID = 101
SEP_ID = 102
#: Python whitespace that BERT's normaliser removes (control characters) rather than splits on.
JOINERS = ("\v", "\f", "\x1c", "\x1d", "\x1e", "\x1f", "\x85")
_DROP_JOINERS = str.maketrans(dict.fromkeys(JOINERS))

Ids = npt.NDArray[np.int64]


class _WordCache(dict[str, bytes]):
    """word -> its ids as int64 bytes; a miss tokenises the word (and may reset the cache)."""

    def __init__(self, tok: Tokenizer, cap: int) -> None:
        super().__init__()
        self._tok = tok
        self._cap = cap

    def __missing__(self, word: str) -> bytes:
        ids = array("q", self._tok.encode(word, add_special_tokens=False).ids).tobytes()
        if len(self) >= self._cap:
            self.clear()
        self[word] = ids
        return ids


class FastTokenizer:
    """WordPiece ids equal to ``tokenizers``', from a per-word cache; head+tail truncation."""

    def __init__(
        self,
        tokenizer_path: Path | str,
        max_tokens: int = 512,
        head: int = 384,
        tail: int = 128,
        special_tokens: bool = False,
        cache_size: int = 200_000,
    ) -> None:
        self._tok = Tokenizer.from_file(str(tokenizer_path))
        self._tok.no_truncation()
        self._tok.no_padding()
        self.max_tokens = max_tokens
        self.head = head
        self.tail = tail
        self.special_tokens = special_tokens
        vocab = self._tok.get_vocab()
        self.cls_id = vocab.get("[CLS]", CLS_ID)
        self.sep_id = vocab.get("[SEP]", SEP_ID)
        self.vocab_size = self._tok.get_vocab_size()
        self._cache = _WordCache(self._tok, cache_size)
        self._lookup = self._cache.__getitem__

    def raw_array(self, text: str) -> Ids:
        """All ids of ``text`` (no truncation, no special tokens) as a read-only int64 array."""
        for j in JOINERS:
            if j in text:
                text = text.translate(_DROP_JOINERS)
                break
        return np.frombuffer(b"".join(map(self._lookup, text.split())), dtype=np.int64)

    def raw_ids(self, text: str) -> list[int]:
        """All ids of ``text`` (no truncation, no special tokens)."""
        ids: list[int] = self.raw_array(text).tolist()
        return ids

    def encode_array(self, text: str) -> Ids:
        """Truncated ids (head + tail), with [CLS]/[SEP] when the bundle asks for them.

        Never empty: an empty prompt gives ``[SEP]`` (one position)."""
        cap = CHARS_PER_TOKEN_CAP * self.max_tokens
        if len(text) > cap:
            keep_head = cap * self.head // self.max_tokens
            text = text[:keep_head] + " " + text[len(text) - (cap - keep_head) :]
        ids = self.raw_array(text)
        budget = self.max_tokens - (2 if self.special_tokens else 0)
        n = ids.shape[0]
        if n > budget:
            tail = budget * self.tail // self.max_tokens
            ids = np.concatenate((ids[: budget - tail], ids[n - tail :]))
        if self.special_tokens:
            ids = np.concatenate(([self.cls_id], ids, [self.sep_id])).astype(np.int64)
        if ids.shape[0] == 0:
            ids = np.array([self.sep_id], dtype=np.int64)  # an empty prompt still needs one
        return ids

    def encode(self, text: str) -> list[int]:
        """``encode_array`` as a list."""
        ids: list[int] = self.encode_array(text).tolist()
        return ids
