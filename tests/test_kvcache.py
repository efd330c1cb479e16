import pytest
import torch
import torch.nn.functional as F
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



@pytest.mark.parametrize("heads,kv_heads,q", [(4, 4, 1), (4, 2, 1), (4, 2, 3)])
def test_cascade_attention_equals_attention_over_the_repeated_prefix(heads, kv_heads, q):
    """Grouped-query heads, a left-padded prefix and causal continuations read as plain attention
    over each sample's own copy of the prefix does."""
    from types import SimpleNamespace

    from chainstep.kvcache import _ACTIVE, SharedPrefixLayer, cascade_attention

    torch.manual_seed(0)
    groups, n, prefix, own, dim = 2, 3, 5, 4, 8
    prefix_keys, prefix_values = torch.randn(2, groups, kv_heads, prefix, dim).unbind(0)
    keys, values = torch.randn(2, groups * n, kv_heads, own, dim).unbind(0)
    query = torch.randn(groups * n, heads, q, dim)
    visible = torch.ones(groups * n, 1, q, prefix + own, dtype=torch.bool)
    visible[:n, ..., :2] = False  # the first prompt is left-padded by two positions
    visible[..., prefix:] &= torch.ones(q, own, dtype=torch.bool).tril(own - q)
    cache = SimpleNamespace(layers=[SharedPrefixLayer(prefix_keys, prefix_values, n)])
    token = _ACTIVE.set(cache)
    try:
        out, _ = cascade_attention(SimpleNamespace(layer_idx=0), query, keys, values, visible)
    finally:
        _ACTIVE.reset(token)
    rep = heads // kv_heads
    full_keys = torch.cat([prefix_keys.repeat_interleave(n, 0), keys], -2).repeat_interleave(rep, 1)
    full_values = torch.cat([prefix_values.repeat_interleave(n, 0), values], -2).repeat_interleave(rep, 1)
    expected = F.scaled_dot_product_attention(query, full_keys, full_values, attn_mask=visible)
    torch.testing.assert_close(out, expected.transpose(1, 2))


def test_shared_prefix_generation_reads_the_prompt_once(tiny_model_dir, test_records, monkeypatch):
    """The policy's n-sample path runs on the shared-prefix cache, whose prompt states are
    stored once per prompt (not once per sample), and leaves the model's attention as it was."""
    import chainstep.kvcache as kvcache
    from chainstep.sampling import Policy, SamplingParams

    policy = Policy.from_dir(tiny_model_dir("llava"), batch_size=8)
    caches = []
    real = kvcache.SharedPrefixCache.__init__

    def spy(self, prefilled, n):
        real(self, prefilled, n)
        caches.append(self)

    monkeypatch.setattr(kvcache.SharedPrefixCache, "__init__", spy)
    before = policy.model.config._attn_implementation
    params = SamplingParams(n=4, temperature=1.0, max_tokens=6, seed=0)
    policy.generate(test_records[:2], params, progress=False)
    assert len(caches) == 1 and policy.model.config._attn_implementation == before
    layer = caches[0].layers[0]
    assert layer.prefix_keys.shape[0] == 2 and layer.keys.shape[0] == 8
