"""HPACK (RFC 7541): the decoder of request header blocks, and literal encoding for replies.

Decoded blocks are cached per connection: Envoy's blocks repeat byte for byte once its dynamic
table is warm, so the hot path decodes nothing. Pure code, no I/O.
"""

from __future__ import annotations

from collections import deque

# RFC 7541 Appendix B: (code, bit length) of symbols 0-255 and EOS (256).
_HUFFMAN = (
    (0x1FF8, 13),
    (0x7FFFD8, 23),
    (0xFFFFFE2, 28),
    (0xFFFFFE3, 28),
    (0xFFFFFE4, 28),
    (0xFFFFFE5, 28),
    (0xFFFFFE6, 28),
    (0xFFFFFE7, 28),
    (0xFFFFFE8, 28),
    (0xFFFFEA, 24),
    (0x3FFFFFFC, 30),
    (0xFFFFFE9, 28),
    (0xFFFFFEA, 28),
    (0x3FFFFFFD, 30),
    (0xFFFFFEB, 28),
    (0xFFFFFEC, 28),
    (0xFFFFFED, 28),
    (0xFFFFFEE, 28),
    (0xFFFFFEF, 28),
    (0xFFFFFF0, 28),
    (0xFFFFFF1, 28),
    (0xFFFFFF2, 28),
    (0x3FFFFFFE, 30),
    (0xFFFFFF3, 28),
    (0xFFFFFF4, 28),
    (0xFFFFFF5, 28),
    (0xFFFFFF6, 28),
    (0xFFFFFF7, 28),
    (0xFFFFFF8, 28),
    (0xFFFFFF9, 28),
    (0xFFFFFFA, 28),
    (0xFFFFFFB, 28),
    (0x14, 6),
    (0x3F8, 10),
    (0x3F9, 10),
    (0xFFA, 12),
    (0x1FF9, 13),
    (0x15, 6),
    (0xF8, 8),
    (0x7FA, 11),
    (0x3FA, 10),
    (0x3FB, 10),
    (0xF9, 8),
    (0x7FB, 11),
    (0xFA, 8),
    (0x16, 6),
    (0x17, 6),
    (0x18, 6),
    (0x0, 5),
    (0x1, 5),
    (0x2, 5),
    (0x19, 6),
    (0x1A, 6),
    (0x1B, 6),
    (0x1C, 6),
    (0x1D, 6),
    (0x1E, 6),
    (0x1F, 6),
    (0x5C, 7),
    (0xFB, 8),
    (0x7FFC, 15),
    (0x20, 6),
    (0xFFB, 12),
    (0x3FC, 10),
    (0x1FFA, 13),
    (0x21, 6),
    (0x5D, 7),
    (0x5E, 7),
    (0x5F, 7),
    (0x60, 7),
    (0x61, 7),
    (0x62, 7),
    (0x63, 7),
    (0x64, 7),
    (0x65, 7),
    (0x66, 7),
    (0x67, 7),
    (0x68, 7),
    (0x69, 7),
    (0x6A, 7),
    (0x6B, 7),
    (0x6C, 7),
    (0x6D, 7),
    (0x6E, 7),
    (0x6F, 7),
    (0x70, 7),
    (0x71, 7),
    (0x72, 7),
    (0xFC, 8),
    (0x73, 7),
    (0xFD, 8),
    (0x1FFB, 13),
    (0x7FFF0, 19),
    (0x1FFC, 13),
    (0x3FFC, 14),
    (0x22, 6),
    (0x7FFD, 15),
    (0x3, 5),
    (0x23, 6),
    (0x4, 5),
    (0x24, 6),
    (0x5, 5),
    (0x25, 6),
    (0x26, 6),
    (0x27, 6),
    (0x6, 5),
    (0x74, 7),
    (0x75, 7),
    (0x28, 6),
    (0x29, 6),
    (0x2A, 6),
    (0x7, 5),
    (0x2B, 6),
    (0x76, 7),
    (0x2C, 6),
    (0x8, 5),
    (0x9, 5),
    (0x2D, 6),
    (0x77, 7),
    (0x78, 7),
    (0x79, 7),
    (0x7A, 7),
    (0x7B, 7),
    (0x7FFE, 15),
    (0x7FC, 11),
    (0x3FFD, 14),
    (0x1FFD, 13),
    (0xFFFFFFC, 28),
    (0xFFFE6, 20),
    (0x3FFFD2, 22),
    (0xFFFE7, 20),
    (0xFFFE8, 20),
    (0x3FFFD3, 22),
    (0x3FFFD4, 22),
    (0x3FFFD5, 22),
    (0x7FFFD9, 23),
    (0x3FFFD6, 22),
    (0x7FFFDA, 23),
    (0x7FFFDB, 23),
    (0x7FFFDC, 23),
    (0x7FFFDD, 23),
    (0x7FFFDE, 23),
    (0xFFFFEB, 24),
    (0x7FFFDF, 23),
    (0xFFFFEC, 24),
    (0xFFFFED, 24),
    (0x3FFFD7, 22),
    (0x7FFFE0, 23),
    (0xFFFFEE, 24),
    (0x7FFFE1, 23),
    (0x7FFFE2, 23),
    (0x7FFFE3, 23),
    (0x7FFFE4, 23),
    (0x1FFFDC, 21),
    (0x3FFFD8, 22),
    (0x7FFFE5, 23),
    (0x3FFFD9, 22),
    (0x7FFFE6, 23),
    (0x7FFFE7, 23),
    (0xFFFFEF, 24),
    (0x3FFFDA, 22),
    (0x1FFFDD, 21),
    (0xFFFE9, 20),
    (0x3FFFDB, 22),
    (0x3FFFDC, 22),
    (0x7FFFE8, 23),
    (0x7FFFE9, 23),
    (0x1FFFDE, 21),
    (0x7FFFEA, 23),
    (0x3FFFDD, 22),
    (0x3FFFDE, 22),
    (0xFFFFF0, 24),
    (0x1FFFDF, 21),
    (0x3FFFDF, 22),
    (0x7FFFEB, 23),
    (0x7FFFEC, 23),
    (0x1FFFE0, 21),
    (0x1FFFE1, 21),
    (0x3FFFE0, 22),
    (0x1FFFE2, 21),
    (0x7FFFED, 23),
    (0x3FFFE1, 22),
    (0x7FFFEE, 23),
    (0x7FFFEF, 23),
    (0xFFFEA, 20),
    (0x3FFFE2, 22),
    (0x3FFFE3, 22),
    (0x3FFFE4, 22),
    (0x7FFFF0, 23),
    (0x3FFFE5, 22),
    (0x3FFFE6, 22),
    (0x7FFFF1, 23),
    (0x3FFFFE0, 26),
    (0x3FFFFE1, 26),
    (0xFFFEB, 20),
    (0x7FFF1, 19),
    (0x3FFFE7, 22),
    (0x7FFFF2, 23),
    (0x3FFFE8, 22),
    (0x1FFFFEC, 25),
    (0x3FFFFE2, 26),
    (0x3FFFFE3, 26),
    (0x3FFFFE4, 26),
    (0x7FFFFDE, 27),
    (0x7FFFFDF, 27),
    (0x3FFFFE5, 26),
    (0xFFFFF1, 24),
    (0x1FFFFED, 25),
    (0x7FFF2, 19),
    (0x1FFFE3, 21),
    (0x3FFFFE6, 26),
    (0x7FFFFE0, 27),
    (0x7FFFFE1, 27),
    (0x3FFFFE7, 26),
    (0x7FFFFE2, 27),
    (0xFFFFF2, 24),
    (0x1FFFE4, 21),
    (0x1FFFE5, 21),
    (0x3FFFFE8, 26),
    (0x3FFFFE9, 26),
    (0xFFFFFFD, 28),
    (0x7FFFFE3, 27),
    (0x7FFFFE4, 27),
    (0x7FFFFE5, 27),
    (0xFFFEC, 20),
    (0xFFFFF3, 24),
    (0xFFFED, 20),
    (0x1FFFE6, 21),
    (0x3FFFE9, 22),
    (0x1FFFE7, 21),
    (0x1FFFE8, 21),
    (0x7FFFF3, 23),
    (0x3FFFEA, 22),
    (0x3FFFEB, 22),
    (0x1FFFFEE, 25),
    (0x1FFFFEF, 25),
    (0xFFFFF4, 24),
    (0xFFFFF5, 24),
    (0x3FFFFEA, 26),
    (0x7FFFF4, 23),
    (0x3FFFFEB, 26),
    (0x7FFFFE6, 27),
    (0x3FFFFEC, 26),
    (0x3FFFFED, 26),
    (0x7FFFFE7, 27),
    (0x7FFFFE8, 27),
    (0x7FFFFE9, 27),
    (0x7FFFFEA, 27),
    (0x7FFFFEB, 27),
    (0xFFFFFFE, 28),
    (0x7FFFFEC, 27),
    (0x7FFFFED, 27),
    (0x7FFFFEE, 27),
    (0x7FFFFEF, 27),
    (0x7FFFFF0, 27),
    (0x3FFFFEE, 26),
    (0x3FFFFFFF, 30),
)
# RFC 7541 Appendix A.
_STATIC: tuple[tuple[str, str], ...] = (
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
)


class HpackError(Exception):
    """A header block that does not decode: a connection error (COMPRESSION_ERROR)."""


class HeaderListTooLarge(Exception):
    """A block that decodes (the table stays in step) to more than the header-list limit."""


def _huffman_fsm() -> tuple[list[tuple[int, bytes, bool]], list[bool]]:
    """A decoding automaton over 4-bit steps: for (state, nibble), the next state, the symbols
    completed and whether the step is valid (no EOS); and the states a string may end in.

    States are the inner nodes of the code tree (the root is 0); a string ends validly at the
    root or inside the all-ones path of at most 7 bits (RFC 7541 §5.2 padding).
    """
    children = [[0, 0]]  # inner nodes; a leaf is stored as -(symbol + 1)
    for symbol, (code, length) in enumerate(_HUFFMAN):
        node = 0
        for shift in range(length - 1, -1, -1):
            bit = (code >> shift) & 1
            if shift == 0:
                children[node][bit] = -(symbol + 1)
            else:
                if not children[node][bit]:
                    children.append([0, 0])
                    children[node][bit] = len(children) - 1
                node = children[node][bit]
    accept = [False] * len(children)
    accept[0] = True
    node = 0
    for _ in range(7):
        node = children[node][1]
        accept[node] = True
    table = []
    for state in range(len(children)):
        for nibble in range(16):
            node, out, valid = state, bytearray(), True
            for shift in (3, 2, 1, 0):
                step = children[node][(nibble >> shift) & 1]
                if step >= 0:
                    node = step
                elif step == -257:  # EOS
                    valid = False
                    break
                else:
                    out.append(-step - 1)
                    node = 0
            table.append((node, bytes(out), valid))
    return table, accept


_FSM, _ACCEPT = _huffman_fsm()


def _byte_fsm() -> list[tuple[int, bytes, bool]]:
    """The nibble automaton composed into 8-bit steps: (state << 8 | byte) → the same triple."""
    table = []
    for state in range(len(_FSM) >> 4):
        for byte in range(256):
            middle, first, valid = _FSM[(state << 4) | (byte >> 4)]
            if not valid:
                table.append((0, b"", False))
                continue
            node, second, valid = _FSM[(middle << 4) | (byte & 15)]
            table.append((node, first + second, valid))
    return table


_BYTE_FSM = _byte_fsm()


def huffman_decode(data: bytes) -> bytes:
    """Decode one Huffman-coded string, a byte at a time (decoded strings and blocks are also
    cached: ``_string``, ``HpackDecoder.decode``)."""
    out = bytearray()
    state = 0
    fsm = _BYTE_FSM
    for byte in data:
        state, emitted, valid = fsm[(state << 8) | byte]
        if not valid:
            raise HpackError("EOS in a Huffman string")
        out += emitted
    if not _ACCEPT[state]:
        raise HpackError("bad Huffman padding")
    return bytes(out)


# Huffman strings already decoded. A header block that changes the dynamic table (Envoy's
# per-request ``traceparent`` when tracing) is not cached whole, but most strings in it repeat.
_STRINGS: dict[bytes, str] = {}


def _integer(block: bytes, i: int, prefix: int) -> tuple[int, int]:
    mask = (1 << prefix) - 1
    value = block[i] & mask
    i += 1
    if value < mask:
        return value, i
    shift = 0
    while True:
        if i >= len(block) or shift > 28:
            raise HpackError("bad integer")
        byte = block[i]
        i += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def _string(block: bytes, i: int) -> tuple[str, int]:
    if i >= len(block):
        raise HpackError("truncated string")
    huffman = block[i] & 0x80
    length, i = _integer(block, i, 7)
    raw = block[i : i + length]
    if len(raw) != length:
        raise HpackError("truncated string")
    if not huffman:
        return raw.decode("latin-1"), i + length
    text = _STRINGS.get(raw)
    if text is None:
        text = huffman_decode(raw).decode("latin-1")
        if len(_STRINGS) >= 256:
            _STRINGS.clear()
        _STRINGS[raw] = text
    return text, i + length


def encode_integer(value: int, prefix: int, first: int = 0) -> bytes:
    """An HPACK integer with a ``prefix``-bit prefix; ``first`` holds the byte's other bits."""
    mask = (1 << prefix) - 1
    if value < mask:
        return bytes((first | value,))
    out = bytearray((first | mask,))
    value -= mask
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """A header as a literal without indexing, new name, no Huffman (RFC 7541 6.2.2)."""
    return b"\x00" + encode_integer(len(name), 7) + name + encode_integer(len(value), 7) + value


class HpackDecoder:
    """One connection's HPACK decoder (the default 4,096-byte table; never resized up).

    ``max_list`` bounds a decoded header list (RFC 9113 SETTINGS_MAX_HEADER_LIST_SIZE: names,
    values and 32 bytes per field); a larger block still updates the table, then raises
    ``HeaderListTooLarge``.
    """

    def __init__(self, max_size: int = 4096, max_list: int = 1 << 30) -> None:
        self.limit = self.max_size = max_size
        self.max_list = max_list
        self.size = 0
        self.table: deque[tuple[str, str]] = deque()
        self._cache: dict[bytes, list[tuple[str, str]]] = {}

    def _get(self, index: int) -> tuple[str, str]:
        if 0 < index <= len(_STATIC):
            return _STATIC[index - 1]
        offset = index - len(_STATIC) - 1
        if 0 <= offset < len(self.table):
            return self.table[offset]
        raise HpackError(f"bad header index {index}")

    def _add(self, name: str, value: str) -> None:
        self.table.appendleft((name, value))
        self.size += len(name) + len(value) + 32
        self._evict()

    def _evict(self) -> None:
        while self.size > self.max_size and self.table:
            name, value = self.table.pop()
            self.size -= len(name) + len(value) + 32

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        """The (name, value) pairs of one complete header block."""
        cached = self._cache.get(block)
        if cached is not None:
            return cached
        headers: list[tuple[str, str]] = []
        changed = False
        listed = 0
        i, end = 0, len(block)
        while i < end:
            byte = block[i]
            if byte & 0x80:  # indexed field
                index, i = _integer(block, i, 7)
                field = self._get(index)
            elif byte & 0xE0 == 0x20:  # dynamic table size update: only before any field
                if headers or listed:
                    raise HpackError("table size update after a header field")
                size, i = _integer(block, i, 5)
                if size > self.limit:
                    raise HpackError("table size update over the limit")
                self.max_size = size
                self._evict()
                changed = True
                continue
            else:
                indexing = bool(byte & 0x40)
                index, i = _integer(block, i, 6 if indexing else 4)
                if index:
                    name = self._get(index)[0]
                else:
                    name, i = _string(block, i)
                value, i = _string(block, i)
                field = (name, value)
                if indexing:
                    self._add(name, value)
                    changed = True
            listed += len(field[0]) + len(field[1]) + 32
            if listed <= self.max_list:
                headers.append(field)
        if listed > self.max_list:
            raise HeaderListTooLarge(listed)
        if changed:
            self._cache.clear()
        else:
            if len(self._cache) >= 64:
                self._cache.clear()
            self._cache[block] = headers
        return headers
