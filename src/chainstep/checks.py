"""Checks a program can make on a chain from the question and the chain's own text.

A policy's commonest slips are ones a calculator sees: a sum it got wrong ("7 + 4 = 10"), an
operand it never read ("Red plus green: 7 + 4" when red was read as 3; "tallest minus shortest"
naming values other than the largest and smallest stated), a quantity the question does not
ask about ("Yellow minus red" when it asks yellow and green), an option letter that names another
option ("red, option B" when the question lists red as A), an answer that is not what the
chain's own facts give (its last result recomputed from the values it stated). None of these
needs the gold answer or task metadata, so the checks work on any benchmark's free text. Each
step gets a verdict: True (something was checked and held), False (a check failed) or None
(nothing checkable: a reading, a judgement); the verifier (`verifier.CheckedVerifier`) lets a
verdict stand for the step and leaves the rest to the learned PRM. No torch here.
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass, field

from .answers import normalize
from .steps import Step

_NUMBER = r"-?\$?\d+(?:,\d{3})*(?:\.\d+)?%?"
_UNIT = r"(?:\s*(?!x\b|times\b)[A-Za-z°]{1,12}\.?(?:\^?[23²³])?)?"
_OP = r"(?:[+\-−*/×÷]|\bx\b|\btimes\b)"
_TERM = rf"\(?\s*{_NUMBER}{_UNIT}\s*\)?"
# a chain of operations on numbers (units allowed after each) that states its result
EXPRESSION = re.compile(rf"(?P<left>{_TERM}(?:\s*{_OP}\s*{_TERM})+)\s*=\s*(?P<right>{_NUMBER})")
NUMBER = re.compile(_NUMBER)
OPTION = re.compile(r"(?P<text>[^,;:.()]*?)[,;:]?\s*\(?\b(?:option|choice)\s*\(?(?P<letter>[A-Z])\b\)?",
                    re.IGNORECASE)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# numbers a chain may use without stating them (halving, percentages, months, angles, unit changes)
CONSTANTS = frozenset({0.0, 1.0, 2.0, 10.0, 12.0, 24.0, 60.0, 90.0, 100.0, 180.0, 360.0, 365.0, 1000.0,
                       3600.0})
LARGEST = frozenset({"largest", "biggest", "tallest", "longest", "highest", "greatest", "most", "maximum"})
SMALLEST = frozenset({"smallest", "shortest", "lowest", "fewest", "least", "minimum"})
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_STOP = frozenset({"the", "of", "a", "an", "and", "from", "image", "in", "is", "are", "there", "to",
                   "shapes", "shape", "bar", "bars", "line", "lines", "count", "number", "total",
                   "plus", "minus", "times", "sum", "difference", "value", "what", "how", "many"})


@dataclass
class StepCheck:
    """What the checks found in one step: a verdict and why (empty reasons when nothing was
    checked)."""

    verdict: bool | None = None
    reasons: list[str] = field(default_factory=list)

    def fail(self, reason: str) -> None:
        self.verdict = False
        self.reasons.append(reason)

    def hold(self, reason: str) -> None:
        if self.verdict is None:
            self.verdict = True
        self.reasons.append(reason)


@dataclass
class ChainCheck:
    steps: list[StepCheck]
    answer: StepCheck

    @property
    def passed(self) -> bool:
        """No check failed anywhere in the chain."""
        return all(c.verdict is not False for c in [*self.steps, self.answer])


def to_number(text: str) -> float | None:
    text = text.replace("$", "").replace(",", "").replace("−", "-").rstrip("%").strip()
    try:
        return float(text)
    except ValueError:
        return None


def evaluate(expression: str, percent: bool = True) -> float | None:
    """The value of a written expression ("3 cm + 4.5 cm", "12 × 3 − 4", "(2 + 3) x 4"), operator
    precedence and brackets honoured; None when it is not plain arithmetic. A percentage is a
    hundredth unless `percent` is False (a result written in percent: "15% + 5% = 20%")."""
    text = re.sub(rf"({_NUMBER}){_UNIT}", r"\1", expression)
    text = text.replace("%", " / 100" if percent else "")
    text = text.replace("$", "").replace(",", "").replace("−", "-")
    text = re.sub(r"\bx\b|×|\btimes\b", "*", text).replace("÷", "/")
    try:
        return _eval(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, KeyError, TypeError):
        return None


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand)
    if isinstance(node, ast.BinOp):
        return _OPS[type(node.op)](_eval(node.left), _eval(node.right))
    raise ValueError("not arithmetic")


def agrees(stated: float, computed: float, written: str) -> bool:
    """`stated` is `computed` to the precision it was written with ("3.33" for 10 / 3)."""
    decimals = _decimals(written)
    return abs(stated - computed) <= max(0.5 * 10 ** -decimals, 1e-9 * abs(computed)) \
        if decimals else abs(stated - computed) < 1e-9 * max(1.0, abs(computed))


def _decimals(written: str) -> int:
    """Digits after the point a number was written with ("3.33" -> 2, "20%" -> 0)."""
    return len(written.split(".")[1].rstrip("%")) if "." in written else 0


def operands(expression: str) -> list[float]:
    return [v for v in (to_number(m) for m in NUMBER.findall(expression)) if v is not None]


def stated_facts(texts: list[str]) -> dict[str, float]:
    """Key word -> value, from statements like "Red shapes: 3" or "the blue bar is 5": a word
    that names exactly one value stated so far (words naming several values are dropped)."""
    seen: dict[str, set[float]] = {}
    for text in texts:
        for match in re.finditer(rf"([A-Za-z][A-Za-z ]{{0,40}}?)\s*(?::|\bis\b|=)\s*({_NUMBER})(?!\s*{_OP})",
                                 text):
            value = to_number(match.group(2))
            for word in _key_words(match.group(1)):
                seen.setdefault(word, set()).add(value)
    return {w: next(iter(v)) for w, v in seen.items() if len(v) == 1}


def _named_value(word: str, facts: dict[str, float]) -> float | None:
    """The value a key word names: a stated fact's ("red"), or the largest or smallest of those
    stated ("tallest minus shortest")."""
    if word in facts:
        return facts[word]
    if len(facts) < 2 or word not in LARGEST | SMALLEST:
        return None
    return max(facts.values()) if word in LARGEST else min(facts.values())


def _named_values(text: str, facts: dict[str, float]) -> list[float]:
    """The values the key words of `text` name ("Red plus green" -> what red and green were)."""
    return [v for w in _key_words(text) if (v := _named_value(w, facts)) is not None]


def _with_named_operands(expression: str, named: list[float]) -> str:
    """`expression` with the operands it miscopied replaced by the values their names were
    stated with ("6 - 4" named [6, 5] -> "6 - 5"); unchanged when the names do not name every
    operand or name the same values. Only what differs is replaced, so word order ("between
    blue and red") never reorders operands that were copied right."""
    used = operands(expression)
    if len(named) != len(used) or sorted(named) == sorted(used):
        return expression
    spare, kept = list(named), []
    for value in used:
        kept.append(value in spare)
        if kept[-1]:
            spare.remove(value)
    replacements, operand = iter(spare), iter(kept)

    def substitute(match: re.Match) -> str:
        written = match.group(0)
        return written if next(operand) else plain(next(replacements)) + "%" * written.endswith("%")

    return NUMBER.sub(substitute, expression)


def _key_words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z]+", text.lower()) if w not in _STOP and len(w) > 1]


def check_arithmetic(text: str, earlier: list[str], question: str, check: StepCheck) -> list[float]:
    """Every expression with a stated result in `text`: recomputed, operands stated before it
    (in the question, an earlier step or earlier in this one), and operands named by key words
    ("Red plus green: 7 + 4") equal to what was stated for them. Returns the results."""
    results = []
    facts = stated_facts(earlier)
    for match in EXPRESSION.finditer(text):
        left, right = match.group("left"), match.group("right")
        value, stated = evaluate(left, percent=not right.endswith("%")), to_number(right)
        if value is None or stated is None:
            continue
        results.append(stated)
        if not agrees(stated, value, right):
            check.fail(f"{left.strip()} is {value:g}, not {right}")
            continue
        check.hold(f"{left.strip()} = {right}")
        before = " ".join([question, *earlier, text[:match.start()]])
        known = {v for v in (to_number(m) for m in NUMBER.findall(before)) if v is not None}
        used = operands(left)
        missing = [v for v in used if abs(v) not in known and v not in known and abs(v) not in CONSTANTS]
        if missing:
            check.fail(f"{', '.join(f'{v:g}' for v in missing)} not stated before {left.strip()}")
            continue
        named = _named_values(text[:match.start()], facts)
        if len(named) == len(used) and sorted(named) != sorted(used):
            check.fail(f"{left.strip()} uses {sorted(used)}, the named values are {sorted(named)}")
        if unasked := _unasked(text[:match.start()], facts, question):
            check.fail(f"{left.strip()} uses {', '.join(unasked)}, which the question does not ask about")
    return results


def _stem(word: str) -> str:
    return word[:-1] if word.endswith("s") and len(word) > 3 else word


def _unasked(text: str, facts: dict[str, float], question: str) -> list[str]:
    """Stated quantities `text` combines that the question does not name, when the question
    names some stated quantity: "Yellow minus red" for "How many more yellow shapes than green
    shapes?" (a question naming none, "how many fruits in total?", binds nothing)."""
    asked = {_stem(w) for w in _key_words(question)}
    if not asked & {_stem(w) for w in facts}:
        return []
    return [w for w in _key_words(text) if w in facts and _stem(w) not in asked]


def check_options(text: str, options: list[str] | None, check: StepCheck) -> list[str]:
    """An "option X" the step names must be the option the question lists under X when the
    step also names an option's text; returns the letters named."""
    letters = []
    for match in OPTION.finditer(text):
        letter = match.group("letter").upper()
        letters.append(letter)
        if not options:
            continue
        index = LETTERS.index(letter)
        if index >= len(options):
            check.fail(f"option {letter} is not among the {len(options)} options")
            continue
        words = normalize(match.group("text")) or ""  # "option B" alone names no option text
        named = [o for o in options if normalize(o) and re.search(rf"\b{re.escape(normalize(o))}\b", words)]
        if named and normalize(options[index]) not in map(normalize, named):
            check.fail(f"option {letter} is {options[index]!r}, not {named[-1]!r}")
        elif named:
            check.hold(f"{options[index]} is option {letter}")
    return letters


def check_steps(steps: list[Step], question: str, options: list[str] | None = None) -> list[StepCheck]:
    """A verdict for each step from the question (with its option list) and the steps before."""
    out, earlier = [], []
    for step in steps:
        check = StepCheck()
        text = f"{step.name}: {step.thought}"
        check_arithmetic(step.thought, earlier, question, check)
        check_options(step.thought, options, check)
        out.append(check)
        earlier.append(text)
    return out


def conclusion(steps: list[Step]) -> tuple[str, str] | None:
    """What the chain concluded: ("letter", X) for the last option named, else ("number", v) for
    the last result stated ("= v") as the chain's own statements give it (recomputed, with the
    values stated for the operands it names), or, failing that, the last number of the last step.

    Recomputing from the chain's own facts is what tells a lucky slip from a wrong chain: after
    "Red line: 6", "Blue line: 5", both "Red minus blue: 6 - 4 = 2" (a miscopied operand) and
    "6 - 4 = 1" (a garbled step) fail their step, but only the second chain's answer is the value
    its facts give."""
    for i in reversed(range(len(steps))):
        thought = steps[i].thought
        letters = [m.group("letter").upper() for m in OPTION.finditer(thought)]
        if letters:
            return "letter", letters[-1]
        results = list(EXPRESSION.finditer(thought))
        if results:
            return "number", _implied_result(results[-1], thought, steps[:i])
    numbers = NUMBER.findall(steps[-1].thought) if steps else []
    return ("number", numbers[-1]) if numbers else None


def _implied_result(match: re.Match, thought: str, earlier: list[Step]) -> str:
    """The result of one written expression recomputed from the chain's facts, written to the
    precision the chain wrote it with; the written result when it is not plain arithmetic."""
    left, right = match.group("left"), match.group("right")
    facts = stated_facts([f"{s.name}: {s.thought}" for s in earlier])
    value = evaluate(_with_named_operands(left, _named_values(thought[:match.start()], facts)),
                     percent=not right.endswith("%"))
    if value is None or agrees(to_number(right), value, right):  # float noise never rewrites a result
        return right
    decimals = _decimals(right)
    return f"{value:.{decimals}f}" if decimals else plain(value)


def plain(value: float) -> str:
    """A number written out in full ("1500000", "2.5"), never in exponent notation."""
    return str(int(value)) if value.is_integer() else repr(value)


def check_answer(steps: list[Step], answer: str | None, options: list[str] | None = None) -> StepCheck:
    """The answer must be the value (or option) the chain concluded, as its own facts give it
    (`conclusion`); an answer missing (a truncated chain) fails."""
    check = StepCheck()
    if answer is None:
        check.fail("no answer")
        return check
    concluded = conclusion(steps)
    if concluded is None:
        return check
    kind, value = concluded
    given = answer.strip().strip("().").upper() if kind == "letter" else answer
    if kind == "letter":
        letter = given if len(given) == 1 else _letter_of(answer, options)
        if letter is None:
            return check
        ok = letter == value
    else:
        number = to_number(NUMBER.findall(given)[-1]) if NUMBER.findall(given) else None
        if number is None:
            return check
        ok = agrees(number, to_number(value), value)
    (check.hold if ok else check.fail)(f"answer {answer!r}, chain concluded {value}")
    return check


def _letter_of(answer: str, options: list[str] | None) -> str | None:
    if not options:
        return None
    hits = [LETTERS[i] for i, o in enumerate(options) if normalize(o) == normalize(answer)]
    return hits[0] if hits else None


def check_chain(steps: list[Step], answer: str | None, question: str,
                options: list[str] | None = None) -> ChainCheck:
    return ChainCheck(check_steps(steps, question, options), check_answer(steps, answer, options))
