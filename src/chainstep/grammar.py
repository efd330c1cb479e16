"""Decoding under the step grammar, so every sampled chain parses (docs/design.md, "Sampling").

The grammar is `steps.render`'s format written as a Lark grammar for llguidance, which
matches the step markers as the tokenizer's own special tokens and the fields as text of any
tokenization. At each position only the tokens that keep the chain inside the grammar are
allowed: structural markers where the format needs them, any text inside a field but a
special token (spelled out in plain text too), the end of sequence only after the answer line.
llguidance does the matching (a Rust Earley parser over token tries); this module only feeds it
the batch.
"""

from __future__ import annotations

import re
from functools import lru_cache

import llguidance
import llguidance.hf
import numpy as np
import torch
from transformers import LogitsProcessor

from .steps import (
    ANSWER_END,
    ANSWER_LINE,
    ANSWER_START,
    NAME_END,
    NAME_START,
    PROCEED,
    REASONING_END,
    REASONING_START,
    REFLECTION_END,
    REFLECTION_START,
    SPECIAL_TOKENS,
    STEP_END,
    STEP_START,
    THOUGHT_END,
    THOUGHT_START,
)

# A field is what `steps.parse` reads as one: any text (newlines too) with some non-space
# character and no special token, not even spelled out in plain-text tokens.
_FIELD = (r"/(?s:.*)[^\s](?s:.*)/ & ~/(?s:.*)(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS)
          + r")(?s:.*)/")
ACTED_MASS = 0.01  # masked probability from which a position counts as one the grammar acted on


def step_grammar() -> str:
    """The Lark grammar of a rendered chain: the language `steps.parse` accepts (the final
    newline optional, as there)."""
    step = " ".join([STEP_START, r'"\n"', NAME_START, "FIELD", NAME_END, r'"\n"', THOUGHT_START, "FIELD",
                     THOUGHT_END, r'"\n"', REFLECTION_START, "FIELD", REFLECTION_END, r'"\n"', STEP_END])
    start = " ".join([REASONING_START, r'"\n"', "step", f'("\\n" {PROCEED} "\\n" step)*', r'"\n"',
                      REASONING_END, f'"\\n{ANSWER_LINE}\\n"', ANSWER_START, "FIELD", ANSWER_END, r'"\n"?'])
    return f"start: {start}\nstep: {step}\nFIELD: {_FIELD}\n"


@lru_cache(maxsize=8)
def _compiled(tokenizer, end_ids: tuple[int, ...]) -> tuple[llguidance.LLTokenizer, str]:
    return (llguidance.hf.from_tokenizer(tokenizer, eos_token=list(end_ids)),
            llguidance.LLMatcher.grammar_from_lark(step_grammar()))


class StepGrammar(LogitsProcessor):
    """Masks, per row of a `generate` batch, every token the step grammar does not allow next.

    `prefixes[i]` are the response tokens row i continues from (step beam search), consumed
    before the first new token. A row that has ended (an end id, or one of `stops`, such as the
    step end a step search stops at), or that left the grammar, is left alone: generate pads it.
    A row whose matcher fails (a prefix outside the grammar, a grammar that did not compile, a
    token the matcher refused) samples free from there, and `errors[i]` says so: the stats count
    it rather than read it as "the grammar never had to act". `interventions[i]` counts the
    positions where the mask changed the distribution the token was drawn from: the model's
    most likely token was masked, or the masked tokens held at least `ACTED_MASS` of its
    probability.
    Masks of the whole batch are filled in one call into one int32 bitmask (llguidance's
    executor), then unpacked on the tensor side."""

    def __init__(self, tokenizer, end_ids: list[int], prefixes: list[list[int]], stops: list[int] = ()):
        lltok, grammar = _compiled(tokenizer, tuple(end_ids))
        self.matchers = [llguidance.LLMatcher(lltok, grammar, log_level=0) for _ in prefixes]
        for matcher, prefix in zip(self.matchers, prefixes):
            matcher.consume_tokens(prefix)
        self.stops = set(end_ids) | set(stops)  # a row that emits one is done: generate pads it
        self.errors = [m.is_error() for m in self.matchers]
        self.free = list(self.errors)
        self.interventions = [0] * len(prefixes)
        self.prompt_length: int | None = None
        self.bitmask = torch.full(((len(prefixes)), (lltok.vocab_size + 31) // 32), -1, dtype=torch.int32)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        elif input_ids.shape[1] > self.prompt_length:
            self._consume(input_ids[:, -1].tolist())
        live = [(m, i) for i, m in enumerate(self.matchers) if not self.free[i]]
        if not live:
            return scores
        self.bitmask.fill_(-1)
        _executor().unsafe_compute_mask_ptr(live, self.bitmask.data_ptr(), self.bitmask.shape[1] * 4,
                                            self.bitmask.shape[0])
        bits = np.unpackbits(self.bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
        vocab = scores.shape[1]
        mask = np.zeros(scores.shape, dtype=bool)
        mask[:, :min(vocab, bits.shape[1])] = bits[:, :vocab]
        mask = torch.from_numpy(mask).to(scores.device)
        top_masked = ~mask.gather(1, scores.argmax(-1, keepdim=True)).squeeze(1)
        masked_mass = scores.float().softmax(-1).masked_fill(mask, 0.0).sum(-1)
        for i in (top_masked | (masked_mass >= ACTED_MASS)).nonzero().flatten().tolist():
            self.interventions[i] += 1
        return scores.masked_fill(~mask, float("-inf"))

    def _consume(self, tokens: list[int]) -> None:
        for i, token in enumerate(tokens):
            if self.free[i]:
                continue
            if token in self.stops:
                self.free[i] = True
            elif not self.matchers[i].consume_token(token):
                self.free[i] = self.errors[i] = True


@lru_cache(maxsize=1)
def _executor() -> llguidance.LLExecutor:
    return llguidance.LLExecutor()
