"""The metric names a PromQL expression reads, for checking dashboards against what the
components export.

A small tokenizer, not a parser: it skips strings, label matchers (``{...}``, except a
``__name__="..."`` equality, which names a metric), range and subquery brackets, numbers,
durations and Grafana variables, and the label lists after ``by``, ``without``, ``on``,
``ignoring``, ``group_left`` and ``group_right``. An identifier left is a metric name unless it
is a keyword or an operator, or is followed by ``(`` (a function or an aggregation).
"""

from __future__ import annotations

import re

KEYWORDS = frozenset(
    {
        "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan",
        # Aggregations take their parameters in parentheses, but may put `by (...)` first.
        "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
        "bottomk", "topk", "quantile", "limitk", "limit_ratio",
    }
)  # fmt: skip
LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_NUMBER = re.compile(r"(0x[0-9a-fA-F]+|[0-9][0-9a-zA-Z_.]*|\.[0-9][0-9a-zA-Z_.]*)")
_VARIABLE = re.compile(r"\$(\{[^}]*\}|[A-Za-z0-9_]+)")
_NAME_MATCHER = re.compile(r"""__name__\s*=\s*(["'`])([A-Za-z_:][A-Za-z0-9_:]*)\1""")


def metric_names(expr: str) -> set[str]:
    """Every metric name ``expr`` selects; ValueError on an unterminated string or bracket."""
    names: set[str] = set()
    i, n = 0, len(expr)
    while i < n:
        c = expr[i]
        if c in "\"'`":
            i = _skip_string(expr, i)
        elif c == "{":
            end = _closing(expr, i, "{", "}")
            names.update(m.group(2) for m in _NAME_MATCHER.finditer(expr, i, end))
            i = end
        elif c == "[":
            i = _closing(expr, i, "[", "]")
        elif c == "$":
            match = _VARIABLE.match(expr, i)
            i = match.end() if match else i + 1
        elif c == "#":  # a comment, to the end of the line
            end = expr.find("\n", i)
            i = n if end < 0 else end
        elif c.isdigit() or (c == "." and i + 1 < n and expr[i + 1].isdigit()):
            match = _NUMBER.match(expr, i)
            assert match is not None
            i = match.end()
        elif (match := _IDENTIFIER.match(expr, i)) is not None:
            word, i = match.group(), match.end()
            following = _next_significant(expr, i)
            if word.lower() in LABEL_LISTS:
                if following < n and expr[following] == "(":
                    i = _closing(expr, following, "(", ")")
            elif following < n and expr[following] == "(":
                pass  # a function or aggregation: its arguments are scanned next
            elif word.lower() not in KEYWORDS:
                names.add(word)
        else:
            i += 1
    return names


def label_values_names(query: str) -> set[str]:
    """The metric names of a Grafana variable query: ``label_values(selector, label)``,
    ``label_values(label)`` (none) or plain PromQL."""
    label = r"\s*[A-Za-z_][A-Za-z0-9_]*\s*"
    if re.fullmatch(rf"\s*label_values\({label}\)\s*", query):
        return set()
    match = re.fullmatch(rf"\s*label_values\((.*),{label}\)\s*", query, re.S)
    return metric_names(match.group(1) if match else query)


def _skip_string(expr: str, start: int) -> int:
    quote, i = expr[start], start + 1
    while i < len(expr):
        if expr[i] == "\\" and quote != "`":
            i += 2
        elif expr[i] == quote:
            return i + 1
        else:
            i += 1
    raise ValueError(f"unterminated string at {start}: {expr!r}")


def _closing(expr: str, start: int, opening: str, closing: str) -> int:
    """The index after the bracket that closes the one at ``start`` (strings skipped)."""
    depth, i = 0, start
    while i < len(expr):
        c = expr[i]
        if c in "\"'`":
            i = _skip_string(expr, i)
            continue
        if c == opening:
            depth += 1
        elif c == closing:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError(f"unclosed {opening!r} at {start}: {expr!r}")


def _next_significant(expr: str, i: int) -> int:
    while i < len(expr) and expr[i].isspace():
        i += 1
    return i
