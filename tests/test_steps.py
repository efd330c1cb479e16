import pytest
from hypothesis import given
from hypothesis import strategies as st

from chainstep.steps import (
    ANSWER_END,
    ANSWER_START,
    SPECIAL_TOKENS,
    STEP_END,
    STEP_TAG,
    Chain,
    FormatError,
    Step,
    extract_answer,
    parse,
    parses,
    prm_text,
    render,
)

EXPECTED = (
    "<|reasoning_start|>\n"
    "<|reasoning_step_start|>\n"
    "<|reasoning_step_name_start|>Count red<|reasoning_step_name_end|>\n"
    "<|reasoning_step_thought_start|>Red shapes: 3<|reasoning_step_thought_end|>\n"
    "<|reasoning_step_reflection_start|>Matches.<|reasoning_step_reflection_end|>\n"
    "<|reasoning_step_end|>\n"
    "<|reasoning_proceed|>\n"
    "<|reasoning_step_start|>\n"
    "<|reasoning_step_name_start|>Add<|reasoning_step_name_end|>\n"
    "<|reasoning_step_thought_start|>Total: 3 + 2 = 5<|reasoning_step_thought_end|>\n"
    "<|reasoning_step_reflection_start|>Correct.<|reasoning_step_reflection_end|>\n"
    "<|reasoning_step_end|>\n"
    "<|reasoning_end|>\n"
    "Answer:\n"
    "<|answer_start|>5<|answer_end|>\n"
)
CHAIN = Chain((Step("Count red", "Red shapes: 3", "Matches."),
               Step("Add", "Total: 3 + 2 = 5", "Correct.")), "5")

field_text = st.text(min_size=1, max_size=30).filter(
    lambda s: s.strip() and not any(t in s for t in SPECIAL_TOKENS))
steps = st.builds(Step, field_text, field_text, field_text)
chains = st.builds(Chain, st.lists(steps, min_size=1, max_size=5).map(tuple), field_text)


def test_special_tokens_in_design_order():
    assert len(SPECIAL_TOKENS) == 17
    assert SPECIAL_TOKENS[0] == "<|reasoning_start|>"
    assert SPECIAL_TOKENS[13] == "<|answer_end|>"
    assert SPECIAL_TOKENS[14:] == ("ки", "к+и", "к-и")


def test_render_is_byte_exact():
    assert render(CHAIN) == EXPECTED


def test_prm_text_tags_every_step_and_the_answer():
    text = prm_text(CHAIN)
    assert text.count(STEP_TAG) == len(CHAIN.steps) + 1
    assert f"{STEP_END}{STEP_TAG}\n" in text
    assert text.endswith(f"{ANSWER_END}{STEP_TAG}\n")
    assert text.replace(STEP_TAG, "") == EXPECTED


@given(chains)
def test_round_trip(chain):
    assert parse(render(chain)) == chain
    assert parses(render(chain)) and not parses(render(chain).replace(STEP_END, "", 1))


@given(chains)
def test_final_newline_is_optional(chain):
    assert parse(render(chain)[:-1]) == chain


@given(chains)
def test_extract_answer_matches_parse(chain):
    assert extract_answer(render(chain)) == chain.answer.strip()


@given(chains, st.integers(min_value=0, max_value=10_000))
def test_any_truncation_raises_format_error(chain, cut):
    text = render(chain)
    cut = cut % (len(text) - 1)  # shorter than the chain minus its optional final newline
    with pytest.raises(FormatError) as err:
        parse(text[:cut])
    assert err.value.code


def _replace(old: str, new: str, count: int = 1) -> str:
    assert old in EXPECTED
    return EXPECTED.replace(old, new, count)


BROKEN = {
    "missing_start": EXPECTED[len("<|reasoning_start|>\n"):],
    "no_steps": "<|reasoning_start|>\n<|reasoning_end|>\nAnswer:\n<|answer_start|>5<|answer_end|>\n",
    "missing_proceed": _replace("<|reasoning_proceed|>\n", ""),
    "missing_step_start": _replace("<|reasoning_proceed|>\n<|reasoning_step_start|>\n",
                                   "<|reasoning_proceed|>\n"),
    "missing_newline": _replace("<|reasoning_step_start|>\n", "<|reasoning_step_start|>"),
    "missing_name": _replace("<|reasoning_step_name_start|>Count red", "Count red"),
    "missing_thought": _replace("<|reasoning_step_thought_start|>", ""),
    "missing_reflection": _replace("<|reasoning_step_reflection_start|>", ""),
    "unclosed_name": EXPECTED.split("<|reasoning_step_name_end|>")[0],
    "unclosed_thought": EXPECTED.split("<|reasoning_step_thought_end|>")[0],
    "unclosed_reflection": EXPECTED.split("<|reasoning_step_reflection_end|>")[0],
    "empty_name": _replace("Count red", " "),
    "empty_thought": _replace("Red shapes: 3", ""),
    "empty_reflection": _replace("Matches.", "\n"),
    "special_token_in_field": _replace("Matches.", "Matches <|answer_start|>"),
    "missing_step_end": _replace("Correct.<|reasoning_step_reflection_end|>\n<|reasoning_step_end|>\n",
                                 "Correct.<|reasoning_step_reflection_end|>\n"),
    "missing_reasoning_end": _replace("<|reasoning_end|>\n", ""),
    "missing_answer": _replace("Answer:\n", ""),
    "unclosed_answer": EXPECTED.replace("<|answer_end|>\n", ""),
    "empty_answer": _replace(f"{ANSWER_START}5", ANSWER_START),
    "text_after_answer": EXPECTED + "more",
}


@pytest.mark.parametrize("code", sorted(BROKEN))
def test_every_error_code(code):
    with pytest.raises(FormatError) as err:
        parse(BROKEN[code])
    assert err.value.code == code


def test_error_codes_are_all_covered():
    from chainstep.steps import ERROR_CODES

    assert set(ERROR_CODES) == set(BROKEN)


@pytest.mark.parametrize("chain, code", [
    (Chain((), "5"), "no_steps"),
    (Chain((Step("", "t", "r"),), "5"), "empty_name"),
    (Chain((Step("n", "t <|answer_end|>", "r"),), "5"), "special_token_in_field"),
    (Chain((Step("n", "t", "r"),), " "), "empty_answer"),
])
def test_render_refuses_what_parse_could_not_read(chain, code):
    with pytest.raises(FormatError) as err:
        render(chain)
    assert err.value.code == code


def test_extract_answer():
    assert extract_answer("blah <|answer_start|> B <|answer_end|> x") == "B"
    assert extract_answer("<|answer_start|>3<|answer_end|><|answer_start|>4<|answer_end|>") == "3"
    assert extract_answer("no answer") is None
    assert extract_answer("<|answer_start|>3") is None
    assert extract_answer("<|answer_start|>  <|answer_end|>") is None


def test_leading_steps_of_a_malformed_chain():
    from chainstep.steps import leading_steps

    chain = Chain((Step("a", "x: 1", "ok"), Step("b", "y: 2", "ok"), Step("c", "z: 3", "ok")), "3")
    text = render(chain)
    assert leading_steps(text) == list(chain.steps)
    cut = text[:text.rfind("<|reasoning_step_thought_end|>")]  # the last step never closes
    assert leading_steps(cut + "<|reasoning_step_end|>\n") == list(chain.steps[:2])
    assert leading_steps("garbage") == []
