"""Built-in personal-data detectors: which one, if any, matches a request's message texts.

Detection returns a detector's name, never the text it matched. A scan works on the UTF-8
bytes of the text: one ``bytes.translate`` maps it to a shape (digit ``#``, capital ``A``,
the separators `` -./()+`` as they are, anything else ``_``), ``find`` on that shape looks for
the few ``SIGNATURES`` every recognised number contains, and only the run of digits, capitals
and separators around a signature is searched by the detectors' regexes and checked (Luhn,
mod-97, check digits and letters). E-mail addresses are looked for only around an ``@``.
Text without such numbers costs the translate and a ``find`` per signature, all in C.

What is recognised (ASCII forms; all patterns need a boundary on both sides):

- ``email``: ``local@domain.tld``, the TLD a two-letter country code or a common generic one.
- ``phone``: E.164 (``+`` country code, 8-15 digits, grouped or not); North American
  ``(212) 555-0147`` / ``212-555-0147`` (area code and exchange 2-9, one separator kind);
  European trunk-prefixed national numbers ``020 7946 0958``, ``030/1234567``,
  ``(030) 1234567`` (0, then 1-9; the groups after the area code of 3+ digits; 10-11
  digits) and five pairs ``01 23 45 67 89`` / ``01.23.45.67.89``.
- ``payment-card``: 13-19 digits, bare or grouped by single spaces or dashes, a known issuer
  prefix (2221-2720, 30, 34-38, 4, 5, 6) and a valid Luhn check digit.
- ``iban``: country code, check digits and the country's exact length (bare or in groups of
  four), mod-97 check.
- ``us-ssn``: ``123-45-6789`` / ``123 45 6789``, not area 000, 666 or 900-999, group 00,
  serial 0000, nor the two published specimen numbers.
- ``uk-nino``: UK National Insurance number (valid prefix letters, suffix A-D).
- ``de-tax-id``: German Steuer-Identifikationsnummer (11 digits, digit-repetition rule, ISO
  7064 MOD 11,10 check digit).
- ``es-dni``: Spanish DNI (8 digits) and NIE (X/Y/Z + 7 digits) with their check letter.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

EMAIL = "email"
PHONE = "phone"
PAYMENT_CARD = "payment-card"
IBAN = "iban"
US_SSN = "us-ssn"
UK_NINO = "uk-nino"
DE_TAX_ID = "de-tax-id"
ES_DNI = "es-dni"
DETECTORS = (EMAIL, PHONE, PAYMENT_CARD, IBAN, US_SSN, UK_NINO, DE_TAX_ID, ES_DNI)
"""Every built-in detector, in the order a scan reports them (the first that matches)."""


def _shape_table() -> bytes:
    table = bytearray(b"_" * 256)
    for c in b"0123456789":
        table[c] = ord("#")
    for c in range(ord("A"), ord("Z") + 1):
        table[c] = ord("A")
    for c in b" -./()+":
        table[c] = c
    return bytes(table)


_SHAPE = _shape_table()
SIGNATURES = (
    b"+#",
    b"(#",
    b"#######",
    b"### ####",
    b"### ### ###",
    b"## ## ##",
    b"###-####",
    b"###-###-###",
    b"###-##-####",
    b"##-##-##-##-##",
    b"###.###.####",
    b"##.##.##.##.##",
    b"###/####",
    b"AA##",
    b"AA ## ##",
    b"AA ####",
)
"""Shapes (digit ``#``, capital ``A``, separators as they are) of which every number the
detectors recognise contains at least one; ``find`` looks for them, and only the runs that
hold one are searched. A unit test checks the detectors against a scan of every position."""

# Left and right edges of numbers: not inside a word, a decimal, a version, a path, a time,
# an amount or an id ("#123", "ORD-123"), nor one group of a longer grouped number
# ("DE89 3704 0044 0532 0130 00"); nothing attached on the right but a full stop.
_L = rb"(?<![\w.,:/#$+@-])(?<!\d[ .-])"
_R = rb"(?![\w:@-]|[.,/]\d)"

# ---- e-mail --------------------------------------------------------------------------------

_LOCAL_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-"
_LOCAL = bytes(ord("a") if c in _LOCAL_CHARS else ord("_") for c in range(256))
_DOMAIN = re.compile(
    rb"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+([A-Za-z]{2,24})(?![A-Za-z0-9-])"
)
_GENERIC_TLDS = frozenset(
    b"com net org edu gov mil int info biz name pro mobi app dev xyz online site tech store "
    b"shop cloud email mail live blog news media agency company digital solutions services "
    b"network systems group global world today website space club design studio page link "
    b"zone top work life health law bank finance consulting software academy school "
    b"university team inc ltd llc gmbh".split()
)


def _emails(data: bytes) -> Iterator[tuple[int, int]]:
    at = data.find(b"@")
    while at != -1:
        # The local part: the run of allowed characters before the "@" (at most 64).
        window = max(0, at - 64)
        start = window + data[window:at].translate(_LOCAL).rfind(b"_") + 1
        while start < at and data[start] == ord("."):
            start += 1
        domain = _DOMAIN.match(data, at + 1) if start < at else None
        if domain is not None:
            tld = domain.group(1).lower()
            if len(tld) == 2 or tld in _GENERIC_TLDS:
                yield start, domain.end()
                at = data.find(b"@", domain.end())
                continue
        at = data.find(b"@", at + 1)


# ---- checks --------------------------------------------------------------------------------


def _digits(text: bytes) -> bytes:
    return bytes(c for c in text if 48 <= c <= 57)


def luhn(digits: bytes) -> bool:
    """True when the last digit is the Luhn check digit of the others."""
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = c - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_prefix(d: bytes) -> bool:
    first = d[0]
    if first == ord("2"):
        return 2221 <= int(d[:4]) <= 2720  # Mastercard's 2-series
    if first == ord("3"):
        return d[1] in b"045678"  # Diners 30/36/38, Amex 34/37, JCB 35
    return first in b"456"


def _card(match: re.Match[bytes]) -> bool:
    text = match.group()
    groups = re.split(rb"[ -]", text)
    if len(groups) > 1 and len({c for c in text if c in b" -"}) > 1:
        return False  # mixed separators
    # The longest run can take in a number that follows ("4111 1111 1111 1111 123"): try
    # the leading groups too, but always from the first.
    for j in range(len(groups), 0, -1):
        d = b"".join(groups[:j])
        if 13 <= len(d) <= 19 and _card_prefix(d) and luhn(d):
            return True
    return False


IBAN_LENGTHS = {
    **dict.fromkeys(["NO"], 15),
    **dict.fromkeys(["BE"], 16),
    **dict.fromkeys(["DK", "FI", "FO", "GL", "NL", "SD"], 18),
    **dict.fromkeys(["MK", "SI"], 19),
    **dict.fromkeys(["AT", "BA", "EE", "KZ", "LT", "LU", "XK"], 20),
    **dict.fromkeys(["CH", "CR", "HR", "LI", "LV"], 21),
    **dict.fromkeys(["BG", "BH", "DE", "GB", "GE", "IE", "ME", "RS", "VA"], 22),
    **dict.fromkeys(["AE", "GI", "IL", "IQ", "TL"], 23),
    **dict.fromkeys(["AD", "CZ", "ES", "MD", "PK", "RO", "SA", "SE", "SK", "TN", "VG"], 24),
    **dict.fromkeys(["LY", "PT", "ST"], 25),
    **dict.fromkeys(["IS", "TR"], 26),
    **dict.fromkeys(["FR", "GR", "IT", "MC", "MR", "SM"], 27),
    **dict.fromkeys(["AL", "AZ", "BY", "CY", "DO", "GT", "HU", "LB", "PL", "SV"], 28),
    **dict.fromkeys(["BR", "EG", "PS", "QA", "UA"], 29),
    **dict.fromkeys(["JO", "KW", "MU"], 30),
    **dict.fromkeys(["MT", "SC"], 31),
    **dict.fromkeys(["LC"], 32),
    **dict.fromkeys(["RU"], 33),
}
"""Country → IBAN length (the SWIFT IBAN registry)."""


def iban_valid(compact: bytes) -> bool:
    """Known country, its exact length, and the ISO 7064 mod-97 check."""
    if IBAN_LENGTHS.get(compact[:2].decode()) != len(compact):
        return False
    moved = compact[4:] + compact[:4]
    number = "".join(str(c - 55) if c >= 65 else chr(c) for c in moved)
    return int(number) % 97 == 1


def _iban(match: re.Match[bytes]) -> bool:
    compact = match.group().replace(b" ", b"")
    expected = IBAN_LENGTHS.get(compact[:2].decode())
    # A grouped IBAN can take in a short group that follows it ("... 3000 EUR").
    return expected is not None and iban_valid(compact[:expected])


_SSN_SPECIMENS = frozenset({b"078051120", b"219099999"})


def _ssn(match: re.Match[bytes]) -> bool:
    area, group, serial = match.group(1), match.group(3), match.group(4)
    return (
        area not in (b"000", b"666")
        and area[0] != ord("9")
        and group != b"00"
        and serial != b"0000"
        and area + group + serial not in _SSN_SPECIMENS
    )


def de_tax_id_valid(digits: bytes) -> bool:
    """Steuer-ID: 11 digits, not starting 0; in the first ten one digit occurs twice or three
    times (never three in a row) and the others once; ISO 7064 MOD 11,10 check digit."""
    if len(digits) != 11 or digits[0] == ord("0"):
        return False
    counts = sorted((digits[:10].count(c) for c in set(digits[:10])), reverse=True)
    if counts[0] not in (2, 3) or any(n != 1 for n in counts[1:]):
        return False
    if counts[0] == 3 and re.search(rb"(\d)\1\1", digits[:10]):
        return False
    product = 10
    for c in digits[:10]:
        total = (c - 48 + product) % 10 or 10
        product = total * 2 % 11
    return (11 - product) % 10 == digits[10] - 48


def _de_tax_id(match: re.Match[bytes]) -> bool:
    return de_tax_id_valid(_digits(match.group()))


_DNI_LETTERS = b"TRWAGMYFPDXBNJZSQVHLCKE"


def _es_dni(match: re.Match[bytes]) -> bool:
    nie, body, dni, letter = match.groups()
    number = int(str(b"XYZ".index(nie)).encode() + body if nie else dni)
    return _DNI_LETTERS[number % 23] == letter[0]


def _phone(match: re.Match[bytes]) -> bool:
    count = len(_digits(match.group()))
    if match.group("intl"):
        return 8 <= count <= 15
    trunk = match.group("trunk")
    if trunk:
        return 10 <= count <= 11 and trunk.count(b"/") <= 1
    return True  # North American: the pattern fixes it


# ---- the detectors ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Detector:
    name: str
    pattern: re.Pattern[bytes]
    valid: Callable[[re.Match[bytes]], bool]
    min_digits: int
    shapes: tuple[bytes, ...] = ()
    """The run's shape must contain one of these (skips the regex where it cannot match)."""


_NUMERIC = (
    _Detector(
        PHONE,
        re.compile(
            _L + rb"(?:"
            # E.164: after the country code, every group begins with a separator or "(", so
            # no run of digits can be split two ways (no backtracking blow-up).
            rb"(?P<intl>\+[1-9]\d{6,14}|\+[1-9]\d{0,3}(?:[ .-]?\(\d{1,4}\)[ .-]?\d{1,6}"
            rb"|[ .-]\d{1,6}){1,7})"
            rb"|(?P<nanp>(?:1[ .-])?(?:\([2-9]\d\d\) ?[2-9]\d\d[ .-]\d{4}"
            rb"|[2-9]\d\d(?P<sep>[ .-])[2-9]\d\d(?P=sep)\d{4}))"
            # Trunk prefix: area code, then groups of 3+ digits; or five pairs (FR, BE).
            rb"|(?P<trunk>(?:0[1-9]\d{0,4}|\(0[1-9]\d{0,4}\))(?:[ /-]\d{3,8}){1,3}"
            rb"|0[1-9](?P<pair>[ .-])\d\d(?:(?P=pair)\d\d){3})"
            rb")(?![ .-]\d)" + _R
        ),
        _phone,
        8,
    ),
    _Detector(
        PAYMENT_CARD,
        re.compile(_L + rb"[2-6]\d{3}(?:[ -]?\d){9,15}" + _R),
        _card,
        13,
        (b"#############", b"### ####", b"###-####"),
    ),
    _Detector(
        IBAN,
        re.compile(
            rb"(?<![\w@-])[A-Z]{2}\d\d(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,4})?)"
            rb"(?![\w@-])"
        ),
        _iban,
        4,
        (b"AA##",),
    ),
    _Detector(
        US_SSN,
        re.compile(_L + rb"(\d{3})([- ])(\d\d)\2(\d{4})" + _R),
        _ssn,
        9,
        (b"###-##-####", b"## ## ##"),
    ),
    _Detector(
        UK_NINO,
        re.compile(
            rb"(?<![\w@-])(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
            rb" ?\d\d ?\d\d ?\d\d ?[A-D](?![\w@-])"
        ),
        lambda match: True,
        6,
        (b"AA##", b"AA ## ##", b"AA ####"),
    ),
    _Detector(
        DE_TAX_ID,
        re.compile(_L + rb"[1-9]\d ?\d{3} ?\d{3} ?\d{3}" + _R),
        _de_tax_id,
        11,
        (b"###########", b"### ### ###"),
    ),
    _Detector(
        ES_DNI,
        re.compile(rb"(?<![\w@-])(?:([XYZ])-?(\d{7})|(\d{8}))-?([A-HJ-NP-TV-Z])(?![\w@-])"),
        _es_dni,
        7,
        (b"#######A", b"#######-A"),
    ),
)


@dataclass(frozen=True, slots=True)
class Finding:
    """Where one detector matched (byte offsets into the UTF-8 text)."""

    detector: str
    start: int
    end: int


class Scanner:
    """The enabled detectors, compiled once per policy (``extproc.config``)."""

    __slots__ = ("_email", "_numeric", "detectors")

    def __init__(self, detectors: Iterable[str] = DETECTORS) -> None:
        enabled = set(detectors)
        unknown = enabled - set(DETECTORS)
        if unknown:
            raise ValueError(f"unknown personal-data detectors: {', '.join(sorted(unknown))}")
        self.detectors = tuple(d for d in DETECTORS if d in enabled)
        self._email = EMAIL in enabled
        self._numeric = tuple(d for d in _NUMERIC if d.name in enabled)

    def first(self, texts: Sequence[str]) -> str:
        """The detector that matches ``texts``: ``email`` when an address is anywhere, else the
        first enabled numeric detector (``DETECTORS`` order) to match in the earliest place
        that has one; "" when none does. One scan over all texts."""
        data = "\n".join(texts).encode()
        if self._email and b"@" in data and next(_emails(data), None) is not None:
            return EMAIL
        if not self._numeric:
            return ""
        return next((f.detector for f in self._numbers(data, stop_early=True)), "")

    def find(self, text: str) -> list[Finding]:
        """Every match in ``text``, in order, overlaps dropped (the earliest start wins)."""
        data = text.encode()
        findings = [Finding(EMAIL, s, e) for s, e in _emails(data)] if self._email else []
        if self._numeric:
            findings.extend(self._numbers(data, stop_early=False))
        findings.sort(key=lambda f: (f.start, -f.end))
        kept: list[Finding] = []
        for finding in findings:
            if not kept or finding.start >= kept[-1].end:
                kept.append(finding)
        return kept

    def redact(self, text: str) -> tuple[str, str]:
        """``text`` with every match replaced by ``[REDACTED:<detector>]``, and the first
        detector (in ``DETECTORS`` order) that matched ("" and ``text`` itself when none)."""
        findings = self.find(text)
        if not findings:
            return text, ""
        data = text.encode()
        out = bytearray()
        at = 0
        for f in findings:
            out += data[at : f.start] + b"[REDACTED:" + f.detector.encode() + b"]"
            at = f.end
        out += data[at:]
        first = min((f.detector for f in findings), key=DETECTORS.index)
        return out.decode(), first

    def _numbers(self, data: bytes, stop_early: bool) -> Iterator[Finding]:
        """Matches of the numeric detectors, run by run (signature by signature). With
        ``stop_early``, only the first: the scan stops there."""
        shape = data.translate(_SHAPE)
        size = len(data)
        searched: set[int] = set()
        for signature in SIGNATURES:
            at = shape.find(signature)
            while at != -1:
                # The run of digits, capitals and separators that holds the signature.
                start = shape.rfind(b"_", 0, at) + 1
                end = shape.find(b"_", at)
                if end == -1:
                    end = size
                at = shape.find(signature, end)
                if start in searched:
                    continue
                searched.add(start)
                digits = shape.count(b"#", start, end)
                stop = min(end + 2, size)  # what the right-hand lookahead reads past the run
                for detector in self._numeric:
                    if digits < detector.min_digits or (
                        detector.shapes
                        and all(shape.find(s, start, end) == -1 for s in detector.shapes)
                    ):
                        continue
                    for match in detector.pattern.finditer(data, start, stop):
                        if detector.valid(match):
                            yield Finding(detector.name, match.start(), match.end())
                            if stop_early:
                                return
