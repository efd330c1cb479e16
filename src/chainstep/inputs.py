"""Model inputs for any HF VLM: the chat prompt, and batches for training and generation.

The processor call is the only architecture-specific part (image placeholders, pixel layouts,
Qwen2-VL's `mm_token_type_ids`, ...), so prompts are encoded one example at a time by the
processor and batched here: per-token tensors are padded, image tensors concatenated.
"""

from __future__ import annotations

import torch
from transformers import BatchFeature, ProcessorMixin

from .errors import ChainstepError
from .records import load_image, prompt_text

PER_TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids", "completion_mask")
TARGET_KEYS = ("labels", "prm_targets")  # per-token training targets, padded with -100


def chat_prompt(processor: ProcessorMixin, record: dict) -> str:
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": prompt_text(record)}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompt(processor: ProcessorMixin, record: dict,
                  prefix: str = "") -> dict[str, torch.Tensor]:
    """One example's prompt (plus an optional response prefix to continue) through the
    processor, without a batch dimension on token keys."""
    enc = processor(text=[chat_prompt(processor, record)], images=[[load_image(record)]],
                    return_tensors="pt")
    example = {k: (v[0] if k in PER_TOKEN_KEYS else v) for k, v in enc.items()}
    if prefix:
        ids = processor.tokenizer(prefix, add_special_tokens=False)["input_ids"]
        extend_text(example, torch.tensor(ids, dtype=example["input_ids"].dtype))
    return example


def extend_text(example: dict[str, torch.Tensor], ids: torch.Tensor) -> None:
    """Append text tokens (in place): attended, and not image tokens."""
    example["input_ids"] = torch.cat([example["input_ids"], ids])
    example["attention_mask"] = torch.ones_like(example["input_ids"])
    for key in PER_TOKEN_KEYS[2:]:
        if key in example:
            example[key] = torch.cat([example[key], torch.zeros_like(ids)])


def encode_example(processor: ProcessorMixin, record: dict, response: str,
                   max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Prompt + response + EOS, with labels on the response tokens only.

    Past `max_length` only the response is cut: cutting into the prompt would drop image tokens
    whose features the model still receives. A prompt longer than `max_length` is an error."""
    tok = processor.tokenizer
    example = encode_prompt(processor, record)
    prompt_len = example["input_ids"].shape[0]
    if max_length and prompt_len >= max_length:
        raise ChainstepError(f"record {record.get('id')}: its prompt alone is {prompt_len} tokens "
                             f"(image tokens included), max_length is {max_length}; raise max_length")
    response_ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    if max_length:
        response_ids = response_ids[:max_length - prompt_len]
    extend_text(example, torch.tensor(response_ids, dtype=example["input_ids"].dtype))
    labels = example["input_ids"].clone()
    labels[:prompt_len] = -100
    example["labels"] = labels
    return example


def collate(examples: list[dict[str, torch.Tensor]], pad_id: int,
            padding_side: str = "right") -> BatchFeature:
    """Pad per-token tensors (targets with -100), concatenate image tensors along dim 0."""
    longest = max(e["input_ids"].shape[0] for e in examples)
    batch = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        if key in PER_TOKEN_KEYS or key in TARGET_KEYS:
            fill = pad_id if key == "input_ids" else -100 if key in TARGET_KEYS else 0
            batch[key] = torch.stack([_pad(v, longest, fill, padding_side) for v in values])
        else:
            batch[key] = torch.cat(values, dim=0)
    return BatchFeature(batch)


def _pad(values: torch.Tensor, length: int, fill: int, side: str) -> torch.Tensor:
    pad = values.new_full((length - values.shape[0],), fill)
    return torch.cat([values, pad] if side == "right" else [pad, values])


class SFTCollator:
    """Encodes (record, response) pairs lazily, so images are read only when a batch needs them."""

    def __init__(self, processor: ProcessorMixin, max_length: int | None = None):
        self.processor, self.max_length = processor, max_length

    def __call__(self, rows: list[dict]) -> BatchFeature:
        examples = [encode_example(self.processor, r, r["response"], self.max_length)
                    for r in rows]
        return collate(examples, self.processor.tokenizer.pad_token_id)
