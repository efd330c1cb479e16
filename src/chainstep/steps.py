"""The chain-of-step text format: the contract every stage reads and writes (docs/design.md §1).

A chain is a list of steps (name, thought, reflection) and an answer. `render` writes the
byte-exact text a policy is trained on; `parse` reads it back strictly, so a malformed model
output is told apart from a wrong one, and `prm_text` adds the `ки` tags a PRM is read at.
Fields may hold any text but the 17 special tokens, newlines included, so parse(render(c)) == c.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|reasoning_start|>",
    "<|reasoning_end|>",
    "<|reasoning_proceed|>",
    "<|reasoning_backtrack|>",
    "<|reasoning_step_start|>",
    "<|reasoning_step_end|>",
    "<|reasoning_step_name_start|>",
    "<|reasoning_step_name_end|>",
    "<|reasoning_step_thought_start|>",
    "<|reasoning_step_thought_end|>",
    "<|reasoning_step_reflection_start|>",
    "<|reasoning_step_reflection_end|>",
    "<|answer_start|>",
    "<|answer_end|>",
    "ки",
    "к+и",
    "к-и",
)

(
    REASONING_START,
    REASONING_END,
    PROCEED,
    BACKTRACK,
    STEP_START,
    STEP_END,
    NAME_START,
    NAME_END,
    THOUGHT_START,
    THOUGHT_END,
    REFLECTION_START,
    REFLECTION_END,
    ANSWER_START,
    ANSWER_END,
    STEP_TAG,
    GOOD_TAG,
    BAD_TAG,
) = SPECIAL_TOKENS

ANSWER_LINE = "Answer:"

# Plain-English meaning of each token; new embedding rows start at the mean of these.
TOKEN_DESCRIPTIONS: dict[str, str] = {
    REASONING_START: "start of reasoning",
    REASONING_END: "end of reasoning",
    PROCEED: "proceed to the next step",
    BACKTRACK: "go back to the previous step",
    STEP_START: "start of a reasoning step",
    STEP_END: "end of a reasoning step",
    NAME_START: "start of the step name",
    NAME_END: "end of the step name",
    THOUGHT_START: "start of the step thought",
    THOUGHT_END: "end of the step thought",
    REFLECTION_START: "start of the step reflection",
    REFLECTION_END: "end of the step reflection",
    ANSWER_START: "start of the final answer",
    ANSWER_END: "end of the final answer",
    STEP_TAG: "score this step",
    GOOD_TAG: "correct step",
    BAD_TAG: "wrong step",
}

_FIELDS = (("name", NAME_START, NAME_END), ("thought", THOUGHT_START, THOUGHT_END),
           ("reflection", REFLECTION_START, REFLECTION_END))


class FormatError(ValueError):
    """A text that is not a chain; `code` names what is wrong, `pos` the character offset."""

    def __init__(self, code: str, message: str, pos: int | None = None):
        super().__init__(f"{code}: {message}" + (f" (at char {pos})" if pos is not None else ""))
        self.code = code
        self.pos = pos


@dataclass(frozen=True)
class Step:
    name: str
    thought: str
    reflection: str


@dataclass(frozen=True)
class Chain:
    steps: tuple[Step, ...] = field(default_factory=tuple)
    answer: str = ""

    def __post_init__(self):
        object.__setattr__(self, "steps", tuple(self.steps))


def _check_field(kind: str, text: str) -> None:
    if not text.strip():
        raise FormatError(f"empty_{kind}", f"the {kind} is empty")
    for token in SPECIAL_TOKENS:
        if token in text:
            raise FormatError("special_token_in_field", f"the {kind} contains {token!r}")


def render(chain: Chain) -> str:
    """The training text of a chain; raises FormatError for a chain `parse` could not read back."""
    if not chain.steps:
        raise FormatError("no_steps", "a chain needs at least one step")
    lines = [REASONING_START]
    for i, step in enumerate(chain.steps):
        if i:
            lines.append(PROCEED)
        lines.append(STEP_START)
        for kind, start, end in _FIELDS:
            value = getattr(step, kind)
            _check_field(kind, value)
            lines.append(f"{start}{value}{end}")
        lines.append(STEP_END)
    _check_field("answer", chain.answer)
    lines += [REASONING_END, ANSWER_LINE, f"{ANSWER_START}{chain.answer}{ANSWER_END}"]
    return "\n".join(lines) + "\n"


def prm_text(chain: Chain) -> str:
    """The PRM input: `ки` after every step end and after the answer, so S steps carry S+1 tags."""
    return tag_response(render(chain))


def tag_response(text: str) -> str:
    """`ки` after every step end and answer end of raw model text, parseable or not, so partial
    chains (step search) and complete ones are tagged by the same rule."""
    return text.replace(STEP_END, STEP_END + STEP_TAG).replace(ANSWER_END, ANSWER_END + STEP_TAG)


class _Cursor:
    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def at(self, literal: str) -> bool:
        return self.text.startswith(literal, self.pos)

    def expect(self, literal: str, code: str, what: str) -> None:
        if not self.at(literal):
            got = self.text[self.pos:self.pos + 40]
            raise FormatError(code, f"expected {what} {literal!r}, found {got!r}", self.pos)
        self.pos += len(literal)

    def until(self, end: str, kind: str) -> str:
        stop = self.text.find(end, self.pos)
        if stop < 0:
            raise FormatError(f"unclosed_{kind}", f"the {kind} is never closed by {end!r}", self.pos)
        value = self.text[self.pos:stop]
        try:
            _check_field(kind, value)
        except FormatError as err:
            raise FormatError(err.code, str(err).split(": ", 1)[1], self.pos) from None
        self.pos = stop + len(end)
        return value


def parse(text: str) -> Chain:
    """Read a rendered chain back; anything but an exact rendering raises FormatError.

    The only slack is the final newline, which generation may stop before.
    """
    cur = _Cursor(text)
    cur.expect(REASONING_START + "\n", "missing_start", "the chain to open with")
    steps = []
    while True:
        if steps:
            if cur.at(STEP_START):
                raise FormatError("missing_proceed", f"expected {PROCEED!r} between steps", cur.pos)
            if not cur.at(PROCEED):
                break
            cur.expect(PROCEED + "\n", "missing_newline", "a newline after")
        if not cur.at(STEP_START):
            code = "no_steps" if not steps else "missing_step_start"
            raise FormatError(code, f"expected {STEP_START!r}", cur.pos)
        cur.expect(STEP_START + "\n", "missing_newline", "a newline after")
        values = {}
        for kind, start, end in _FIELDS:
            cur.expect(start, f"missing_{kind}", f"the step {kind}")
            values[kind] = cur.until(end, kind)
            cur.expect("\n", "missing_newline", "a newline after the field")
        cur.expect(STEP_END + "\n", "missing_step_end", "the step to close with")
        steps.append(Step(**values))
    cur.expect(REASONING_END + "\n", "missing_reasoning_end", "the reasoning to close with")
    cur.expect(ANSWER_LINE + "\n" + ANSWER_START, "missing_answer", "the answer")
    answer = cur.until(ANSWER_END, "answer")
    if cur.text[cur.pos:] not in ("", "\n"):
        raise FormatError("text_after_answer", f"found {cur.text[cur.pos:cur.pos + 40]!r}", cur.pos)
    return Chain(tuple(steps), answer)


def parses(text: str) -> bool:
    """Does `text` keep the step grammar? (Chains that do not are scored wrong.)"""
    try:
        parse(text)
        return True
    except FormatError:
        return False


def leading_steps(text: str) -> list[Step]:
    """The well-formed steps a (possibly malformed) chain starts with: what a judge can still
    rate before the point where the format breaks."""
    ends, start = [], 0
    while (at := text.find(STEP_END, start)) >= 0:
        start = at + len(STEP_END)
        ends.append(start)
    closing = f"\n{REASONING_END}\n{ANSWER_LINE}\n{ANSWER_START}x{ANSWER_END}"
    for end in reversed(ends):
        try:
            return list(parse(text[:end] + closing).steps)
        except FormatError:
            continue
    return []


def extract_answer(text: str) -> str | None:
    """The stripped text between the first answer start and the next answer end, else None."""
    start = text.find(ANSWER_START)
    if start < 0:
        return None
    start += len(ANSWER_START)
    end = text.find(ANSWER_END, start)
    if end < 0:
        return None
    return text[start:end].strip() or None


ERROR_CODES: tuple[str, ...] = (
    "missing_start", "no_steps", "missing_proceed", "missing_step_start", "missing_newline",
    "missing_name", "missing_thought", "missing_reflection", "unclosed_name", "unclosed_thought",
    "unclosed_reflection", "empty_name", "empty_thought", "empty_reflection",
    "special_token_in_field", "missing_step_end", "missing_reasoning_end", "missing_answer",
    "unclosed_answer", "empty_answer", "text_after_answer",
)


def tag_count(response: str) -> int:
    """How many step tags a response's structure calls for: one after every step end and answer
    end (both are special tokens, so counting them in text counts them in ids)."""
    return response.count(STEP_END) + response.count(ANSWER_END)
