import pytest
import torch
from transformers import DynamicCache

from chainstep.inputs import collate, encode_prompt
from chainstep.kvcache import GrowingCache, GrowingLayer
from chainstep.models import load


def _greedy(model, processor, records, cache, tokens=16):
    batch = collate([encode_prompt(processor, r) for r in records], processor.tokenizer.pad_token_id,
                    padding_side="left")
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id, past_key_values=cache)
    return out[:, batch["input_ids"].shape[1]:]


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "idefics3"])
def test_generate_matches_the_dynamic_cache(tiny_model_dir, test_records, arch):
    model, processor = load(tiny_model_dir(arch))
    records = test_records[:3]
    cache = GrowingCache(model.config)
    grown = _greedy(model, processor, records, cache, tokens=80)  # past the first buffer's growth
    assert grown.tolist() == _greedy(model, processor, records, DynamicCache(config=model.config),
                                     tokens=80).tolist()
    layer = cache.layers[0]
    assert isinstance(layer, GrowingLayer)
    assert layer._key_buffer.shape[-2] > layer.keys.shape[-2]  # views of a larger buffer


def test_layer_writes_in_place_and_follows_replaced_states():
    layer = GrowingLayer()
    first = torch.randn(2, 1, 3, 4)
    keys, _ = layer.update(first, first.clone())
    buffer = layer._key_buffer
    step = torch.randn(2, 1, 1, 4)
    keys, values = layer.update(step, step.clone())
    assert layer._key_buffer is buffer and keys.shape == (2, 1, 4, 4)
    assert torch.equal(keys[..., :3, :], first) and torch.equal(values[..., 3:, :], step)
    layer.crop(-2)  # a view still: the next step writes where the crop ended
    keys, _ = layer.update(step, step)
    assert keys.shape[-2] == 3 and torch.equal(keys[..., 2:, :], step)
    layer.batch_repeat_interleave(3)  # replaced by a plain tensor: the buffer is rebuilt around it
    keys, _ = layer.update(step.repeat_interleave(3, 0), step.repeat_interleave(3, 0))
    assert keys.shape == (6, 1, 4, 4) and keys.data_ptr() == layer._key_buffer.data_ptr()
    assert torch.equal(keys[::3, :, :2], first[..., :2, :])

