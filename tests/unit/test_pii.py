"""The personal-data detectors: positives, tricky negatives, redaction, and the prefilter
checked against a search of every position."""

from __future__ import annotations

import time
from typing import get_args

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from switchyard.extproc import pii
from switchyard.extproc.pii import DETECTORS, Scanner, de_tax_id_valid, iban_valid, luhn
from switchyard.operator.policy import Detector

SCANNER = Scanner()

POSITIVES = {
    "email": [
        "write to maria.lopez@example.com today",
        "cc: j_smith+billing@mail.co.uk.",
        "<ops-team@corp.example.io>",
        "Contact: Hans.Muller@firma.de",
    ],
    "phone": [
        "call +44 20 7946 0958 tonight",
        "whatsapp +447700900123",
        "+1 (212) 555-0147",
        "+49 (0)30 123456",
        "office (212) 555-0147, ask for Bo",
        "cell 212-555-0147.",
        "cell 212.555.0147",
        "London 020 7946 0958",
        "Tel. 030/1234567",
        "Berlin (030) 1234567",
        "mobile 07700 900123",
        "Paris 01 23 45 67 89",
        "Paris 01.23.45.67.89",
    ],
    "payment-card": [
        "card 4111 1111 1111 1111 exp 12/27",
        "4111-1111-1111-1111",
        "pay with 4111111111111111.",
        "amex 3782 822463 10005",
        "mc 5555 5555 5555 4444",
        "mc 2223 0031 2200 3222",
        "visa 4111 1111 1111 1111 123",  # a CVV glued on: the leading groups still count
    ],
    "iban": [
        "IBAN DE89 3704 0044 0532 0130 00 please",
        "DE89370400440532013000",
        "GB29 NWBK 6016 1331 9268 19",
        "to FR14 2004 1010 0505 0001 3M02 606.",
        "NL91 ABNA 0417 1643 00",
    ],
    "us-ssn": ["SSN 123-45-6789", "ssn: 536 22 1234"],
    "uk-nino": ["NI number AB 12 34 56 C", "nino: JG103759A", "CE 123456 D"],
    "de-tax-id": ["Steuer-ID 36 574 261 809", "IdNr. 36574261809"],
    "es-dni": ["DNI 12345678Z", "NIE X1234567L", "nie Y-1234567-X", "dni 00000000T"],
}

NEGATIVES = [
    # e-mail lookalikes
    "x = a@b.shape",
    "result = weights@inputs.sum()",
    "@decorator\ndef f(): ...",
    "npm i @scope/pkg@1.2.3",
    "image@sha256:9f86d081884c7d659a2feaa0c55ad015",
    "ssh user@localhost",
    # checksums that fail
    "card 4111 1111 1111 1112",
    "1234 5678 9012 3456",
    "4111-1111 1111-1111",  # mixed separators
    "DE89 3704 0044 0532 0130 01",
    "XX89 3704 0044 0532 0130 00",
    "SSN 666-45-6789",
    "SSN 000-12-3456",
    "SSN 123-00-4567",
    "SSN 900-12-3456",
    "078-05-1120",
    "QQ123456C",
    "BG 12 34 56 A",
    "36574261890",
    "DNI 12345678A",
    # timestamps, dates, versions, IPs, prices, ids
    "2026-11-30T08:20:00Z",
    "at 2026-11-30 08:20:00.123456+01:00",
    "on 30.11.2026 10:30",
    "on 02.03.2024 10 people came",
    "09/30/2026 08:20",
    "epoch 1732953600000 ns 1732953600123456789",
    "version 10.0.19041.1 and 4.16.27",
    "ip 192.168.100.200 and 10.0.0.1:8080",
    "price $1,234,567.89 or 1 234 567,89 EUR",
    "order #555-123-4567",
    "ORD-2024-000123456",
    "invoice INV-212-555-0147",
    "uuid 3f2a9c1e-4b7d-4e8f-9a6b-1c2d3e4f5a6b",
    "sha 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "pi = 3.14159265358979323846",
    "tz UTC+01:00",
    "isbn 978-3-16-148410-0",
    # code with numbers
    "for i in range(1000000): x[i] = i * 31 % 1000003",
    "SELECT * FROM t WHERE id IN (1001, 1002, 1003) LIMIT 50",
    "const PORTS = [8080, 8443, 9090]; // 2026-11-30",
    "assert hash(x) == 0x7fffffffffffffff",
    "matrix = [[1, 2, 3], [4, 5, 6]]",
]


@pytest.mark.parametrize(
    ("detector", "text"), [(d, t) for d, texts in POSITIVES.items() for t in texts]
)
def test_positive(detector: str, text: str) -> None:
    assert SCANNER.first([text]) == detector
    assert Scanner([detector]).first([text]) == detector
    redacted, found = SCANNER.redact(text)
    assert found == detector
    assert f"[REDACTED:{detector}]" in redacted


@pytest.mark.parametrize("text", NEGATIVES)
def test_negative(text: str) -> None:
    assert SCANNER.first([text]) == ""
    assert SCANNER.redact(text) == (text, "")


def test_every_detector_has_positives_and_the_policy_schema_lists_them() -> None:
    assert set(POSITIVES) == set(DETECTORS)
    assert get_args(Detector) == DETECTORS


def test_checksums() -> None:
    assert luhn(b"79927398713") and not luhn(b"79927398710")
    assert iban_valid(b"GB82WEST12345698765432")
    assert not iban_valid(b"GB82WEST12345698765433")
    assert not iban_valid(b"GB82WEST1234569876543")  # one short for GB
    assert de_tax_id_valid(b"36574261809")
    assert not de_tax_id_valid(b"36574261890")
    assert not de_tax_id_valid(b"11111111116")  # one digit ten times
    assert not de_tax_id_valid(b"06574261809")


def test_only_enabled_detectors_run() -> None:
    text = "mail a.b@example.com, card 4111 1111 1111 1111"
    assert Scanner(["payment-card"]).first([text]) == "payment-card"
    assert Scanner(["iban"]).first([text]) == ""
    with pytest.raises(ValueError, match="unknown personal-data detectors: passport"):
        Scanner(["email", "passport"])


def test_all_texts_are_scanned_and_not_joined_into_one_number() -> None:
    assert SCANNER.first(["hello", "there", "mail me: x@example.org"]) == "email"
    # Two halves of a card in two messages are not a card.
    assert SCANNER.first(["4111 1111", "1111 1111"]) == ""


def test_redaction_replaces_every_match_and_keeps_the_rest() -> None:
    text = "Hi, I'm Zoë (zoe@example.com, +44 20 7946 0958); IBAN GB29 NWBK 6016 1331 9268 19."
    redacted, found = SCANNER.redact(text)
    assert redacted == ("Hi, I'm Zoë ([REDACTED:email], [REDACTED:phone]); IBAN [REDACTED:iban].")
    assert found == "email"


# ---- the prefilter loses nothing ------------------------------------------------------------


def brute_force(text: str) -> set[str]:
    """Every numeric detector's regex over the whole text, every match validated."""
    data = text.encode()
    return {d.name for d in pii._NUMERIC for m in d.pattern.finditer(data) if d.valid(m)}


SAMPLES = [t for d, texts in POSITIVES.items() if d != "email" for t in texts]
pieces = st.one_of(
    st.sampled_from(SAMPLES),
    st.text(alphabet="0123456789 -./()+ABCDEGHXYZ", max_size=30),
    st.sampled_from([" ", "\n", "a", "#", ":", ",", "$", "-", "+", "0"]),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(pieces, max_size=12))
def test_the_prefilter_finds_what_a_search_of_every_position_finds(parts: list[str]) -> None:
    text = "".join(parts)
    found = brute_force(text)
    assert bool(SCANNER.first([text])) == bool(found)
    assert {f.detector for f in SCANNER.find(text)} <= found
    if found:
        assert SCANNER.first([text]) in found


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=3000))
def test_any_text_is_scanned_without_error_and_fast(text: str) -> None:
    started = time.perf_counter()
    SCANNER.first([text])
    redacted, found = SCANNER.redact(text)
    assert (redacted == text) == (found == "")
    assert time.perf_counter() - started < 0.25


@pytest.mark.parametrize(
    "text",
    [
        "1" * 200_000,
        "+1 " * 60_000,
        ("a" * 60 + "!b@") * 5_000,
        ("x@" + "a" * 70) * 2_000,
        "AB12 " * 40_000,
        "0" + " 123" * 50_000,
        "4111 " * 40_000,
        "@a." * 50_000,
    ],
)
def test_hostile_text_is_scanned_in_linear_time(text: str) -> None:
    started = time.perf_counter()
    SCANNER.first([text])
    SCANNER.redact(text)
    assert time.perf_counter() - started < 2.0, "catastrophic backtracking"
