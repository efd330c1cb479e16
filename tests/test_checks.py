import pytest

from chainstep.checks import check_answer, check_chain, check_steps, evaluate, stated_facts
from chainstep.steps import Step
from chainstep.teacher import ProgrammaticTeacher


def steps(*thoughts: str) -> list[Step]:
    return [Step(f"Step {i}", t, "ok") for i, t in enumerate(thoughts)]


def verdicts(checks) -> list:
    return [c.verdict for c in checks]


@pytest.mark.parametrize("text, value", [
    ("7 + 4", 11), ("3 cm + 4.5 cm", 7.5), ("12 × 3 − 4", 32), ("(2 + 3) x 4", 20),
    ("$1,200 - $300", 900), ("10 / 4", 2.5), ("6 times 7", 42), ("2 * 3 + 4 * 5", 26),
])
def test_evaluate_reads_written_arithmetic(text, value):
    assert evaluate(text) == pytest.approx(value)


def test_evaluate_refuses_what_is_not_arithmetic():
    assert evaluate("__import__('os')") is None
    assert evaluate("2 ** 10") is None


def test_suite_arithmetic_slips_fail_and_right_steps_hold():
    chain = steps("Red shapes: 3", "Blue shapes: 4", "Green shapes: 2", "Red plus blue: 3 + 4 = 8")
    assert verdicts(check_steps(chain, "How many red and blue shapes are there in total?")) == \
        [None, None, None, False]
    right = steps("Red shapes: 3", "Blue shapes: 4", "Green shapes: 2", "Red plus blue: 3 + 4 = 7")
    assert verdicts(check_steps(right, "q")) == [None, None, None, True]


def test_an_operand_never_stated_or_bound_to_another_colour_fails():
    unstated = steps("Red bar: 3", "Blue bar: 4", "Tallest minus shortest: 6 - 3 = 3")
    assert verdicts(check_steps(unstated, "What is the difference?"))[-1] is False
    miscopied = steps("Red shapes: 3", "Blue shapes: 4", "Green shapes: 7", "Red plus blue: 7 + 4 = 11")
    check = check_steps(miscopied, "q")[-1]
    assert check.verdict is False and "named values" in check.reasons[-1]
    three = ("Red bar: 3", "Green bar: 4", "Blue bar: 7")
    assert verdicts(check_steps(steps(*three, "Red plus green plus blue: 3 + 4 + 7 = 14"), "q"))[-1] is True
    assert verdicts(check_steps(steps(*three, "Red plus green plus blue: 3 + 4 + 4 = 11"), "q"))[-1] is False
    # a number the question states is an operand the chain may use
    assert verdicts(check_steps(steps("Cost: 5 + 12 = 17"), "A pen costs 5 and a book 12."))[0] is True


def test_a_quantity_the_question_does_not_ask_about_fails():
    counts = ("Red shapes: 1", "Green shapes: 2", "Blue shapes: 2", "Yellow shapes: 3")
    question = "How many more yellow shapes than green shapes are there?"
    check = check_steps(steps(*counts, "Yellow minus red: 3 - 1 = 2"), question)[-1]
    assert check.verdict is False and "red, which the question does not ask" in check.reasons[-1]
    assert verdicts(check_steps(steps(*counts, "Yellow minus green: 3 - 2 = 1"), question))[-1] is True
    # a question that names none of the stated quantities binds nothing; plurals name singulars
    fruit = ("Apple: 3", "Pear: 4")
    assert verdicts(check_steps(steps(*fruit, "Apple plus pear: 3 + 4 = 7"), "How many fruits?"))[-1] is True
    assert verdicts(check_steps(steps(*fruit, "Apple plus pear: 3 + 4 = 7"),
                                "How many apples and pears are there?"))[-1] is True


def test_superlatives_name_the_largest_and_smallest_stated_values():
    bars = ("Red bar: 3", "Green bar: 2", "Blue bar: 3", "Yellow bar: 5")
    check = check_steps(steps(*bars, "Tallest minus shortest: 5 - 1 = 4"), "q")[-1]  # 1: no bar, a constant
    assert check.verdict is False and "named values are [2.0, 5.0]" in check.reasons[-1]
    assert verdicts(check_steps(steps(*bars, "Tallest minus shortest: 5 - 2 = 3"), "q"))[-1] is True
    assert verdicts(check_steps(steps(*bars, "Shortest plus tallest: 2 + 5 = 7"), "q"))[-1] is True


def test_option_letters_are_checked_against_the_question_list():
    chain = steps("Red shape: large", "Blue shape: small", "Largest: red, option B")
    options = ["red", "blue", "green"]
    assert verdicts(check_steps(chain, "What colour is the largest shape?", options))[-1] is False
    fixed = steps("Red shape: large", "Blue shape: small", "Largest: red, option A")
    assert verdicts(check_steps(fixed, "q", options))[-1] is True
    assert verdicts(check_steps(steps("Pick option F"), "q", options))[0] is False
    assert verdicts(check_steps(fixed, "q", None))[-1] is None  # no list: nothing to check
    for bare in ("option B", "red. option B", ".option A"):  # a letter with no option text before it
        assert verdicts(check_steps(steps(bare), "q", options)) == [None], bare


def test_answer_must_be_what_the_chain_concluded():
    chain = steps("Red shapes: 3", "Blue shapes: 4", "Red plus blue: 3 + 4 = 7")
    assert check_answer(chain, "7").verdict is True
    assert check_answer(chain, "8").verdict is False
    assert check_answer(chain, None).verdict is False  # a truncated chain has no answer
    letter = steps("Largest: red, option A")
    assert check_answer(letter, "A").verdict is True
    assert check_answer(letter, "(B)").verdict is False
    assert check_answer(letter, "red", ["red", "blue"]).verdict is True
    assert check_answer(steps("The sky looks blue"), "blue").verdict is None


def test_the_answer_is_what_the_chain_facts_give_not_its_miscopied_step():
    read = ("Red line: 6", "Green line: 4", "Blue line: 5")
    miscopied = steps(*read, "Red minus blue: 6 - 4 = 2")  # consistent arithmetic on green's value
    assert check_answer(miscopied, "2").verdict is False
    garbled = steps(*read, "Red minus blue: 6 - 4 = 1")  # a slip whose answer the facts still give
    assert check_answer(garbled, "1").verdict is True
    assert verdicts(check_steps(miscopied, "q"))[-1] is False  # both steps still fail
    assert verdicts(check_steps(garbled, "q"))[-1] is False
    wrong_sum = steps("Red shapes: 3", "Blue shapes: 4", "Red plus blue: 3 + 4 = 8")
    assert check_answer(wrong_sum, "8").verdict is False
    # names in another order than the operands reorder nothing that was copied right
    reordered = steps("Blue bar: 5", "Red bar: 6", "The difference between blue and red: 6 - 5 = 1")
    assert check_answer(reordered, "1").verdict is True
    assert check_answer(steps("Total: 2.5 + 1.25 = 3.75"), "3.75").verdict is True  # written precision
    scaled = steps("Scaled: 4.35 * 100 = 435")  # 434.99999999999994 in floats
    assert check_answer(scaled, "435").verdict is True
    big = steps("North: 1,234,567", "South: 7,654,321",
                "North plus south: 1,234,567 + 7,654,321 = 8,888,888")
    assert check_answer(big, "8,888,888").verdict is True  # all seven digits count
    assert check_answer(big, "8,888,889").verdict is False


def test_benchmark_style_free_text():
    # MathVista-like: decimals and units; the area step is right, the total is not
    mathvista = steps("The rectangle is 4.5 cm by 2 cm.", "Area = 4.5 cm x 2 cm = 9 cm^2",
                      "Two of them: 9 + 9 = 19")
    assert verdicts(check_steps(mathvista, "What is the total area of the two rectangles?")) == \
        [None, True, False]
    # ChartQA-like: thousands separators and percentages, a rounded quotient
    chartqa = steps("The 2019 bar is 1,250 and the 2020 bar is 1,500.", "Increase: 1,500 - 1,250 = 250",
                    "Growth: 250 / 1,250 x 100 = 20%", "Per month: 250 / 12 = 20.83")
    checks = check_steps(chartqa, "By what percentage did sales grow from 2019 to 2020?")
    assert verdicts(checks) == [None, True, True, True]
    assert check_answer(chartqa[:3], "20%").verdict is True


def test_stated_facts_keep_only_unambiguous_words():
    facts = stated_facts(["Red shapes: 3", "From the image, blue bar: 5", "Red plus blue: 3 + 5 = 8"])
    assert facts == {"red": 3.0, "blue": 5.0}


def test_teacher_chains_of_every_family_pass(train_records):
    teacher = ProgrammaticTeacher()
    for record in train_records:
        chain = teacher.chain(record)
        result = check_chain(list(chain.steps), chain.answer, record["question"], record.get("options"))
        assert result.passed, (record["id"], [c.reasons for c in result.steps], result.answer.reasons)


def test_no_sampled_text_makes_a_check_raise():
    """Policies write anything: a check gives a verdict or none, never an exception (a bare
    "option B" once stopped a whole run's search)."""
    import random

    pieces = ["option", "choice", "B", "(C)", ".", ",", ":", ";", "=", "+", "-", "*", "/", "x", "3", "4.5",
              "12", "red", "Red", "blue", "%", "cm", "(", ")", "answer", " ", "", "option Z", "1/0", "2 ^ 99"]
    rng = random.Random(0)
    for _ in range(2000):
        thoughts = ["".join(rng.choice(pieces) + rng.choice(["", " "]) for _ in range(rng.randint(0, 8)))
                    for _ in range(rng.randint(1, 3))]
        options = rng.choice([None, [], ["red", "blue"], [".", "", "3"]])
        answer = rng.choice([None, "", "B", "3", thoughts[-1]])
        check_steps(steps(*thoughts), rng.choice(["q", "", "How many red and blue?"]), options)
        check_answer(steps(*thoughts), answer, options)
