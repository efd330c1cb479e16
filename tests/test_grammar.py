"""Decoding under the step grammar: what the matcher allows, and sampled chains that parse."""

from dataclasses import replace

import torch

from chainstep.grammar import StepGrammar
from chainstep.sampling import Policy, SamplingParams
from chainstep.steps import (
    ANSWER_LINE,
    PROCEED,
    REASONING_END,
    REASONING_START,
    STEP_END,
    Chain,
    Step,
    parses,
    render,
)

CHAIN = render(Chain([Step("Count red", "Red shapes: 2", "Checked."), Step("Add", "2 + 1 = 3", "Ok.")], "3"))


def _grammar(processor, prefixes: list[str]) -> tuple[StepGrammar, list[int]]:
    tok = processor.tokenizer
    ends = [tok.eos_token_id]
    ids = [tok(p, add_special_tokens=False)["input_ids"] if p else [] for p in prefixes]
    return StepGrammar(tok, ends, ids), ends


def _allowed(grammar: StepGrammar, vocab: int, rows: int) -> list[set[int]]:
    scores = grammar(torch.zeros(rows, 3, dtype=torch.long), torch.zeros(rows, vocab))
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in scores]


def test_only_the_structure_the_format_needs_next_is_allowed(tiny_model_dir):
    from chainstep.models import load

    _, processor = load(tiny_model_dir("llava"))
    tok, vocab = processor.tokenizer, len(processor.tokenizer)
    after_step = CHAIN[:CHAIN.index(STEP_END) + len(STEP_END)]
    grammar, ends = _grammar(processor, ["", after_step, after_step + "\n", CHAIN])
    start, newline, choice, done = _allowed(grammar, vocab, 4)
    assert start == {tok.convert_tokens_to_ids(REASONING_START)}
    assert newline and all(tok.decode([t]).startswith("\n") for t in newline)
    names = {tok.convert_ids_to_tokens(t) for t in choice}
    assert {PROCEED, REASONING_END} <= names
    assert not any(n.startswith("<|") for n in names - {PROCEED, REASONING_END})
    assert done == set(ends)  # a complete chain may only end
    assert grammar.free == [False] * 4


def test_a_broken_prefix_is_left_unconstrained_and_interventions_are_counted(tiny_model_dir):
    from chainstep.models import load

    _, processor = load(tiny_model_dir("llava"))
    tok, vocab = processor.tokenizer, len(processor.tokenizer)
    grammar, _ = _grammar(processor, ["", CHAIN.replace(ANSWER_LINE, "Reply:")])
    assert grammar.free == [False, True]
    scores = torch.zeros(2, vocab)
    scores[:, tok.convert_tokens_to_ids(PROCEED)] = 5.0  # the model's top token breaks the format
    out = grammar(torch.zeros(2, 3, dtype=torch.long), scores)
    assert out[0].argmax() == tok.convert_tokens_to_ids(REASONING_START) and grammar.interventions == [1, 0]
    assert torch.isfinite(out[1]).all()
    assert grammar.errors == [False, True]  # the broken row sampled free, and says so


def test_interventions_count_the_probability_the_mask_removed(tiny_model_dir):
    from chainstep.models import load

    _, processor = load(tiny_model_dir("llava"))
    tok, vocab = processor.tokenizer, len(processor.tokenizer)
    start = tok.convert_tokens_to_ids(REASONING_START)
    counts = []
    for top in (30.0, 3.0):  # the allowed start token holds ~all the probability, then ~2%
        grammar, _ = _grammar(processor, [""])
        scores = torch.zeros(1, vocab)
        scores[0, start] = top
        grammar(torch.zeros(1, 3, dtype=torch.long), scores)
        counts.append(grammar.interventions[0])
    assert counts == [0, 1] and grammar.errors == [False]


def test_every_sampled_chain_parses_under_the_grammar(sft_model_dir, test_records):
    """Hot sampling from a briefly trained policy breaks the format often; under the grammar a
    chain that ends (not cut at max_tokens) always parses."""
    policy = Policy.from_dir(sft_model_dir, batch_size=16)
    hot = SamplingParams(n=4, temperature=1.3, max_tokens=256, seed=0)
    free = [g for gens in policy.generate(test_records[:4], replace(hot, grammar=False)) for g in gens]
    bound = [g for gens in policy.generate(test_records[:4], hot) for g in gens]
    assert hot.constrained and not SamplingParams().constrained  # on when sampling, off for greedy
    assert not all(parses(g.text) for g in free) and all(g.grammar_interventions == 0 for g in free)
    finished = [g for g in bound if g.finish_reason == "stop"]
    assert finished and all(parses(g.text) for g in finished)
    assert sum(g.grammar_interventions for g in bound) > 0


def test_the_grammar_accepts_exactly_what_the_parser_reads(tiny_model_dir):
    """Property test: on random token sequences (valid chains and their mutations: special tokens
    inserted, dropped or spelled out in plain-text tokens, newlines and blanks in fields), the
    grammar matcher accepts a sequence if and only if `parse` reads its decoded text."""
    import random

    import llguidance

    from chainstep.grammar import _compiled
    from chainstep.models import load_processor
    from chainstep.steps import SPECIAL_TOKENS

    tok = load_processor(tiny_model_dir("llava")).tokenizer
    ends = [tok.eos_token_id]
    lltok, grammar = _compiled(tok, tuple(ends))
    rng = random.Random(0)
    plain = [t for t in SPECIAL_TOKENS if not t.startswith("к")]
    words = ["Red", " shapes", ":", " 2", "\n", " ", "\t", "ok", ".", "<", "|", "answer", "_end", "|>", "ки"]

    def text_ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    def spelled(token: str) -> list[int]:  # a special token written with ordinary tokens
        return [i for piece in (token[:2], token[2:-2], token[-2:]) for i in text_ids(piece)]

    def chain_ids() -> list[int]:
        steps = [Step(*(rng.choice(["a", "Red shapes: 2", "x\ny", "2 + 1 = 3"]) for _ in range(3)))
                 for _ in range(rng.randint(1, 3))]
        return text_ids(render(Chain(steps, rng.choice(["3", "B", "1.5 cm"]))))

    def mutate(ids: list[int]) -> list[int]:
        ids, at = list(ids), rng.randrange(len(ids) + 1)
        kind = rng.randrange(6)
        if kind == 0 and ids:
            del ids[min(at, len(ids) - 1)]
        elif kind == 1:
            ids[at:at] = text_ids(rng.choice(SPECIAL_TOKENS))
        elif kind == 2:
            ids[at:at] = spelled(rng.choice(plain))
        elif kind == 3:
            ids[at:at] = text_ids(rng.choice(words))
        elif kind == 4 and ids:
            ids = ids[:at]
        return ids

    accepted = 0
    for case in range(400):
        ids = chain_ids()
        for _ in range(case % 4):
            ids = mutate(ids)
        matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        grammar_ok = matcher.consume_tokens(ids) and not matcher.is_error() and matcher.is_accepting()
        text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert grammar_ok == parses(text), (text, grammar_ok)
        accepted += grammar_ok
    assert 100 < accepted < 350  # both sides of the language were drawn
