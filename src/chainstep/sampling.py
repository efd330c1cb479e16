"""The one generation path: a Policy (VLM + processor) turning task records into responses.

Batched and KV-cached through Hugging Face `generate`; prompts are left-padded so a batch
decodes together. Stops are token ids, never decoded strings: the step tokens vanish when a
decoder skips special tokens. `stop_at_step` ends a sequence after `<|reasoning_step_end|>`
(step-level search), and `prefixes` continue partial responses (rollouts).
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.progress import Progress
from transformers import LogitsProcessorList, PreTrainedModel, ProcessorMixin

from .errors import ChainstepError
from .grammar import StepGrammar
from .inputs import PER_TOKEN_KEYS, collate, encode_prompt
from .kvcache import (
    SHARED_PREFIX_MODELS,
    GrowingCache,
    SharedPrefixCache,
    can_share,
    shared_attention,
    sharing_refusal,
)
from .models import load
from .steps import BAD_TAG, GOOD_TAG, SPECIAL_TOKENS, STEP_END, STEP_TAG

# Architectures whose n samples may start from one shared prefill (tested equal to the plain
# path); others (Qwen2-VL's multimodal rotary positions) re-encode the prompt per sample.


def derived_seed(seed: int | None, *parts) -> int | None:
    """A seed of its own for one piece of seeded work (a chunk of questions, a beam depth), the
    same whichever pieces ran before it in this process."""
    if seed is None:
        return None
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:4], "big")


def seeded_chunks(items: list, seed: int | None, key, size: int = 64, pending=None):
    """`items` cut into fixed chunks, each with its own seed (from `seed` and the key of its first
    item): a resumed stage cuts the same chunks and redraws a half-done one exactly. With
    `pending`, only the chunks holding an item it says is not done yet."""
    for start in range(0, len(items), size):
        chunk = items[start:start + size]
        if pending is None or any(pending(item) for item in chunk):
            yield chunk, derived_seed(seed, key(chunk[0]))


@dataclass
class SamplingParams:
    """Sampling knobs with OpenAI/vLLM names."""

    n: int = 1  # completions per prompt
    temperature: float = 0.0  # 0 = greedy; 1.0 samples from the model's distribution
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1.0 = off
    top_k: int = 0  # 0 = off
    max_tokens: int = 256  # new tokens per completion
    stop_at_step: bool = False  # also stop after each <|reasoning_step_end|>
    seed: int | None = None
    grammar: bool | None = None  # decode under the step grammar; None: when sampling (temperature > 0)

    @property
    def constrained(self) -> bool:
        return self.temperature > 0 if self.grammar is None else self.grammar

    def __post_init__(self):
        if self.n < 1:
            raise ChainstepError(f"n={self.n} must be >= 1")
        if self.temperature < 0:
            raise ChainstepError(f"temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ChainstepError(f"top_p={self.top_p} must be in (0, 1]")
        if self.n > 1 and self.temperature == 0:
            raise ChainstepError("n > 1 needs temperature > 0 (greedy gives n identical answers)")


@dataclass
class Generation:
    text: str
    num_tokens: int
    finish_reason: str  # "stop" (end of sequence), "step" (step end), or "length"
    grammar_interventions: int = 0  # positions where the step grammar changed the distribution (grammar.py)
    grammar_error: bool = False  # asked for the grammar, sampled (partly) without it: a matcher error,
    # a prefix outside the grammar, or a backend that has none (vLLM)


def end_ids(tokenizer, generation_config=None) -> list[int]:
    """Tokens that end a response: the tokenizer's EOS and every EOS the generation config names
    (chat checkpoints end a turn with a token of their own: Llama-3 `<|eot_id|>`, Qwen `<|im_end|>`)."""
    extra = getattr(generation_config, "eos_token_id", None)
    ids = [tokenizer.eos_token_id, *(extra if isinstance(extra, (list, tuple)) else [extra])]
    return list(dict.fromkeys(i for i in ids if i is not None))


def foreign_token_ids(tokenizer, ends: list[int] | None = None) -> list[int]:
    """Tokens a policy never writes: added tokens that are not step markers or turn ends (an
    <image> in a response would break the image/token alignment wherever it is re-encoded), and
    the PRM's tags (a `ки` in a response would shift every step label of it)."""
    tags = {STEP_TAG, GOOD_TAG, BAD_TAG}
    keep = set(ends or end_ids(tokenizer))
    return sorted(i for i, t in tokenizer.added_tokens_decoder.items()
                  if (t.content not in SPECIAL_TOKENS or t.content in tags) and i not in keep)


def decode_response(tokenizer, ids: list[int], ends: list[int] | None = None) -> str:
    """Response text up to the first turn end, step markers kept."""
    ends = ends or end_ids(tokenizer)
    cut = next((i for i, token in enumerate(ids) if token in ends), len(ids))
    return tokenizer.decode(ids[:cut], skip_special_tokens=False)


def weights_fingerprint(path: str | Path) -> list[list]:
    """A model's identity, the same on any machine and in any folder, without reading all of
    its weights: each weight file's name, size and a hash of its first and last megabyte (two
    trainings differ there as everywhere else)."""
    out = []
    for file in sorted(Path(path).glob("*.safetensors")):
        size = file.stat().st_size
        with file.open("rb") as handle:
            head = handle.read(1 << 20)
            handle.seek(max(0, size - (1 << 20)))
            digest = hashlib.sha256(head + handle.read()).hexdigest()[:16]
        out.append([file.name, size, digest])
    return out


class Policy:
    """A VLM that answers task records; `batch_size` counts sequences, prompts times n."""

    fingerprint: list | None = None  # set when loaded from a folder

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin, batch_size: int = 32,
                 share_prefix: bool = True):
        self.model, self.processor, self.batch_size = model.eval(), processor, batch_size
        self.share_prefix = share_prefix
        self.prefix_refusal = sharing_refusal(model.config)  # why n samples cannot share a prefill
        if share_prefix and self.prefix_refusal and model.config.model_type in SHARED_PREFIX_MODELS:
            print(f"chainstep: samples re-encode their prompt (no shared prefix): {self.prefix_refusal}",
                  file=sys.stderr)
        self._read_tokens(processor.tokenizer, model.generation_config)

    def _read_tokens(self, tok, generation_config=None) -> None:
        """Stop and suppressed token ids, looked up by string."""
        self.end_ids, self.pad_id = end_ids(tok, generation_config), tok.pad_token_id
        self.step_end_id = tok.convert_tokens_to_ids(STEP_END)
        if self.step_end_id is None or self.step_end_id == tok.unk_token_id:
            raise ChainstepError("the tokenizer lacks the step tokens; run `chainstep add-tokens`")
        self.suppress_ids = foreign_token_ids(tok, self.end_ids)

    @classmethod
    def from_dir(cls, path: str | Path, batch_size: int = 32, device: str | None = None,
                 share_prefix: bool = True) -> Policy:
        model, processor = load(path, device=device)
        policy = cls(model, processor, batch_size, share_prefix)
        policy.fingerprint = weights_fingerprint(path)
        return policy

    @torch.inference_mode()
    def generate(self, records: list[dict], params: SamplingParams | None = None,
                 prefixes: list[str] | None = None, progress: bool = True
                 ) -> list[list[Generation]]:
        """`params.n` generations per record, in record order. A seeded call draws from its own
        stream, whatever this policy generated before: a resumed stage redraws exactly what it
        would have drawn uninterrupted."""
        params = params or SamplingParams()
        prefixes = prefixes or [""] * len(records)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        per_batch = max(1, self.batch_size // params.n)
        results: list[list[Generation]] = []
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("generating", total=len(records))
            for start in range(0, len(records), per_batch):
                chunk = slice(start, start + per_batch)
                results += self._generate_batch(records[chunk], prefixes[chunk], params)
                bar.advance(task, len(records[chunk]))
        return results

    def _generate_batch(self, records, prefixes, params) -> list[list[Generation]]:
        examples = [encode_prompt(self.processor, r, p) for r, p in zip(records, prefixes)]
        batch = collate(examples, self.pad_id, padding_side="left").to(self.model.device)
        stops = self.end_ids + ([self.step_end_id] if params.stop_at_step else [])
        sample = params.temperature > 0
        knobs = dict(max_new_tokens=params.max_tokens, do_sample=sample,
                     temperature=params.temperature if sample else None,
                     top_p=params.top_p if sample else None, top_k=params.top_k if sample else None,
                     eos_token_id=stops, pad_token_id=self.pad_id,
                     suppress_tokens=self.suppress_ids or None)
        grammar = self._grammar(prefixes, params.n, stops) if params.constrained else None
        if grammar:
            knobs["logits_processor"] = LogitsProcessorList([grammar])
        if params.n > 1 and self.shares_prefix:
            out = self._generate_shared(batch, params.n, knobs)
        else:
            out = self.model.generate(**batch, num_return_sequences=params.n,
                                      past_key_values=GrowingCache(self.model.config), **knobs)
        new = out[:, batch["input_ids"].shape[1]:].tolist()
        gens = [self._finish(ids, stops) for ids in new]
        if grammar:
            gens = [replace(g, grammar_interventions=k, grammar_error=e)
                    for g, k, e in zip(gens, grammar.interventions, grammar.errors)]
        return [gens[i * params.n:(i + 1) * params.n] for i in range(len(records))]

    def _grammar(self, prefixes: list[str], n: int, stops: list[int]) -> StepGrammar:
        """One grammar matcher per generated row (rows of a prompt are consecutive)."""
        tok = self.processor.tokenizer
        ids = [tok(p, add_special_tokens=False)["input_ids"] if p else [] for p in prefixes]
        return StepGrammar(tok, self.end_ids, [row for row in ids for _ in range(n)], stops)

    @property
    def shares_prefix(self) -> bool:
        return self.share_prefix and self.prefix_refusal is None

    def _generate_shared(self, batch, n: int, knobs: dict) -> torch.Tensor:
        """n continuations of each prompt from one prefill: the prompt (image included) is
        encoded once, and its keys and values are kept once and read once per step for all n
        (`kvcache.SharedPrefixCache`), instead of re-encoding or copying them per sample."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        head = {k: (v[:, :-1] if k in PER_TOKEN_KEYS else v) for k, v in batch.items()}
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, :-1]  # as generate counts them: pads skipped
        cache = self.model(**head, position_ids=positions, use_cache=True,
                           past_key_values=GrowingCache(self.model.config)).past_key_values
        expanded = dict(input_ids=ids.repeat_interleave(n, 0), attention_mask=mask.repeat_interleave(n, 0))
        if not can_share(cache):
            cache.batch_repeat_interleave(n)
            return self.model.generate(**expanded, past_key_values=cache, **knobs)
        shared = SharedPrefixCache(cache, n)
        with shared_attention(self.model, shared):
            return self.model.generate(**expanded, past_key_values=shared, **knobs)

    def _finish(self, ids: list[int], stops: list[int]) -> Generation:
        """Cut at the first stop id: EOS is dropped, a step end is kept (it is step text)."""
        for i, token in enumerate(ids):
            if token in self.end_ids:
                return Generation(self._decode(ids[:i]), i + 1, "stop")
            if token in stops:
                return Generation(self._decode(ids[:i + 1]), i + 1, "step")
        return Generation(self._decode(ids), len(ids), "length")

    def _decode(self, ids: list[int]) -> str:
        return self.processor.tokenizer.decode(ids, skip_special_tokens=False)


class VLLMPolicy(Policy):
    """The same `generate` on vLLM, for fast sampling where it is installed (GPU machines).

    Prompts are built by the same chat template and stops are the same token ids; the model runs
    in vLLM's engine instead of `transformers`. Token suppression of non-step added tokens is not
    applied here (vLLM has no per-request token mask that survives every version), and neither
    is the step grammar: vLLM's own structured outputs take llguidance grammars, untested here."""

    def __init__(self, path: str | Path, batch_size: int = 256, **engine_kwargs):
        try:
            from vllm import LLM
        except ImportError:
            raise ChainstepError("the vllm backend needs `pip install vllm` (GPU machines)") from None
        from transformers import AutoProcessor, GenerationConfig

        self.processor = AutoProcessor.from_pretrained(path)
        self.llm = LLM(model=str(path), limit_mm_per_prompt={"image": 1}, **engine_kwargs)
        self.batch_size, self.share_prefix = batch_size, False
        self._read_tokens(self.processor.tokenizer, GenerationConfig.from_pretrained(path))
        self.fingerprint = weights_fingerprint(path)

    def generate(self, records: list[dict], params: SamplingParams | None = None,
                 prefixes: list[str] | None = None, progress: bool = True) -> list[list[Generation]]:
        from vllm import SamplingParams as EngineParams

        from .inputs import chat_prompt
        from .records import load_image

        params = params or SamplingParams()
        prefixes = prefixes or [""] * len(records)
        stops = self.end_ids + ([self.step_end_id] if params.stop_at_step else [])
        engine = EngineParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                              top_k=params.top_k or -1, max_tokens=params.max_tokens, seed=params.seed,
                              stop_token_ids=stops, skip_special_tokens=False)
        prompts = [{"prompt": chat_prompt(self.processor, r) + p,
                    "multi_modal_data": {"image": load_image(r)}} for r, p in zip(records, prefixes)]
        outputs = self.llm.generate(prompts, engine, use_tqdm=progress)
        unconstrained = params.constrained  # asked for the grammar, which this backend does not apply
        return [[replace(self._finish(list(o.token_ids), stops), grammar_error=unconstrained)
                 for o in out.outputs] for out in outputs]


def load_policy(path: str | Path, backend: str = "hf", batch_size: int = 32) -> Policy:
    """A policy on the chosen backend: `hf` (transformers generate) or `vllm`."""
    if backend == "vllm":
        return VLLMPolicy(path)
    if backend != "hf":
        raise ChainstepError(f"backend {backend!r}: choose hf or vllm")
    return Policy.from_dir(path, batch_size=batch_size)
