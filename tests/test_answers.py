import pytest

from chainstep.answers import is_correct, normalize


@pytest.mark.parametrize("raw, expected", [
    ("B", "B"), ("(b)", "B"), ("c.", "C"), (" 5 ", "5"), ("5.0", "5"), ("1,000", "1000"),
    ("2.5", "2.5"), ("Red  Circle", "red circle"), ("", None), (None, None), ("  ", None),
])
def test_normalize(raw, expected):
    assert normalize(raw) == expected


def test_is_correct():
    assert is_correct("(A)", "A")
    assert is_correct("7.0", "7")
    assert not is_correct("6", "7")
    assert not is_correct(None, "7")
