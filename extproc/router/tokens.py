"""Fast, exact WordPiece ids for the router, with a head+tail truncation policy.

The Hugging Face ``tokenizers`` pipeline costs about 1 ms for a 512-token prompt on one core,
more than the whole router budget. BERT pre-tokenisation never lets a token cross whitespace
or ASCII punctuation, so the prompt is split there with one regular expression and each piece
is looked up in a word -> ids cache; only unseen pieces go through ``tokenizers`` (which applies
the full normaliser: lower-casing, accent stripping, CJK and Unicode punctuation splitting).
The ids are identical to ``tokenizers``' own (checked in the unit tests); the cache is bounded.

Truncation: a prompt longer than ``max_tokens`` keeps its first ``head`` and its last ``tail``
tokens: instructions tend to sit at the start and the actual question at the end of long
prompts. Text beyond ``CHARS_PER_TOKEN_CAP * max_tokens`` characters is cut (head and tail
in the same proportion) before tokenising, so cost stays bounded for huge prompts.
"""

from __future__ import annotations

import re
from pathlib import Path

from tokenizers import Tokenizer

_PIECES = re.compile(r"[^\s!-/:-@\[-`{-~]+|[!-/:-@\[-`{-~]")
CHARS_PER_TOKEN_CAP = 16
CLS_ID = 101
SEP_ID = 102


class FastTokenizer:
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
        self._cache: dict[str, list[int]] = {}
        self._cache_size = cache_size

    def _piece(self, piece: str) -> list[int]:
        ids = self._cache.get(piece)
        if ids is None:
            ids = self._tok.encode(piece, add_special_tokens=False).ids
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[piece] = ids
        return ids

    def raw_ids(self, text: str) -> list[int]:
        """All ids of ``text`` (no truncation, no special tokens)."""
        out: list[int] = []
        piece = self._piece
        for p in _PIECES.findall(text):
            out.extend(piece(p))
        return out

    def encode(self, text: str) -> list[int]:
        """Truncated ids (head + tail), with [CLS]/[SEP] when the bundle asks for them."""
        cap = CHARS_PER_TOKEN_CAP * self.max_tokens
        if len(text) > cap:
            keep_head = cap * self.head // self.max_tokens
            text = text[:keep_head] + " " + text[len(text) - (cap - keep_head) :]
        ids = self.raw_ids(text)
        budget = self.max_tokens - (2 if self.special_tokens else 0)
        if len(ids) > budget:
            tail = budget * self.tail // self.max_tokens
            ids = ids[: budget - tail] + (ids[len(ids) - tail :] if tail else [])
        if self.special_tokens:
            ids = [self.cls_id, *ids, self.sep_id]
        if not ids:
            ids = [self.sep_id]  # an empty prompt still needs one position
        return ids
