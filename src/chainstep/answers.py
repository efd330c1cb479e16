"""Answer normalisation: the canonical form votes count and exact matching compares. Matching an
answer against its record (a benchmark's own rule included) is `grading.matches`."""

from __future__ import annotations

import re

_LETTER = re.compile(r"^\(?([A-Za-z])\)?[.:]?$")


def normalize(answer: str | None) -> str | None:
    """Canonical form: option letters upper-cased without brackets, numbers as plain numbers."""
    if answer is None:
        return None
    text = answer.strip().rstrip(".").strip()
    if not text:
        return None
    letter = _LETTER.match(text)
    if letter:
        return letter.group(1).upper()
    number = text.replace(",", "")
    try:
        value = float(number)
    except ValueError:
        return " ".join(text.lower().split())
    return str(int(value)) if value == int(value) else repr(value)


def is_correct(predicted: str | None, reference: str) -> bool:
    """Exact match after normalisation; a missing prediction is wrong."""
    pred = normalize(predicted)
    return pred is not None and pred == normalize(reference)

