import pytest

from chainstep.errors import ChainstepError
from chainstep.sampling import Policy, SamplingParams
from chainstep.steps import STEP_END


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return Policy.from_dir(tiny_model_dir("llava"), batch_size=8)


def test_greedy_batched_equals_one_at_a_time(policy, test_records):
    records = test_records[:4]
    params = SamplingParams(max_tokens=12)
    batched = [g[0].text for g in policy.generate(records, params)]
    policy.batch_size = 1
    single = [g[0].text for g in policy.generate(records, params)]
    policy.batch_size = 8
    assert batched == single


def test_n_samples_per_record(policy, test_records):
    out = policy.generate(test_records[:3], SamplingParams(n=4, temperature=1.0, max_tokens=6,
                                                           seed=0))
    assert [len(g) for g in out] == [4, 4, 4]
    assert all(g.num_tokens <= 6 for gens in out for g in gens)
    assert len({g.text for g in out[0]}) > 1


def test_finish_cuts_at_stop_ids(policy):
    tok = policy.processor.tokenizer
    ids = tok("Red shapes: 3", add_special_tokens=False)["input_ids"]
    step_end = policy.step_end_id
    gen = policy._finish(ids + [step_end] + ids, [policy.end_ids[0], step_end])
    assert gen.finish_reason == "step" and gen.text == "Red shapes: 3" + STEP_END
    gen = policy._finish(ids + [policy.end_ids[0], 5, 6], [policy.end_ids[0]])
    assert gen.finish_reason == "stop" and gen.text == "Red shapes: 3"
    assert policy._finish(ids, [policy.end_ids[0]]).finish_reason == "length"


def test_prefix_extends_the_prompt_for_every_architecture(tiny_model_dir, test_records):
    from chainstep.inputs import PER_TOKEN_KEYS, encode_prompt
    from chainstep.models import load

    prefix = "<|reasoning_start|>\n<|reasoning_step_start|>\n"
    for arch in ("llava", "qwen2_vl"):
        _, processor = load(tiny_model_dir(arch))
        ids = processor.tokenizer(prefix, add_special_tokens=False)["input_ids"]
        plain = encode_prompt(processor, test_records[0])
        extended = encode_prompt(processor, test_records[0], prefix)
        assert extended["input_ids"].tolist() == plain["input_ids"].tolist() + ids
        for key in PER_TOKEN_KEYS:
            if key in plain:
                assert extended[key].shape == extended["input_ids"].shape


def test_params_are_validated():
    with pytest.raises(ChainstepError, match="n > 1 needs temperature"):
        SamplingParams(n=2)
    with pytest.raises(ChainstepError, match="top_p"):
        SamplingParams(top_p=0)


@pytest.mark.parametrize("arch", ["llava", "llava_next", "idefics3", "internvl"])
def test_shared_prefill_gives_the_same_samples(tiny_model_dir, sft_model_dir, test_records, arch):
    """Whole sampled chains (temperature 1, full length, the same seed) from one shared prefill
    equal those from n prefills, on every architecture that shares; prefixes of different
    lengths exercise left padding."""
    path = sft_model_dir if arch == "llava" else tiny_model_dir(arch)
    shared, plain = Policy.from_dir(path, batch_size=8), Policy.from_dir(path, batch_size=8)
    plain.share_prefix = False
    assert shared.shares_prefix and not plain.shares_prefix  # two different code paths
    params = SamplingParams(n=2, temperature=1.0, max_tokens=96, seed=3)
    prefixes = ["", "<|reasoning_start|>\n", "<|reasoning_start|>\n<|reasoning_step_start|>\n"]
    a = [[g.text for g in gs] for gs in shared.generate(test_records[:3], params, prefixes, progress=False)]
    b = [[g.text for g in gs] for gs in plain.generate(test_records[:3], params, prefixes, progress=False)]
    assert a == b
    assert max(len(text) for texts in a for text in texts) > 100  # long samples, not a few argmaxes


def test_qwen2_vl_never_shares_a_prefill(tiny_model_dir):
    """Its multimodal rotary positions depend on the whole sequence: it re-encodes per sample."""
    assert not Policy.from_dir(tiny_model_dir("qwen2_vl")).shares_prefix


def test_a_text_model_the_cascade_would_get_wrong_is_refused():
    """Softcapped, sliding-window or untested text attention stays on the plain path."""
    from transformers import Gemma2Config, LlamaConfig, LlavaConfig, Qwen2Config

    from chainstep.kvcache import sharing_refusal

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1)
    assert sharing_refusal(LlavaConfig(text_config=LlamaConfig(**small))) is None
    assert sharing_refusal(LlavaConfig(text_config=Qwen2Config(**small))) is None
    windowed = Qwen2Config(**small, use_sliding_window=True, sliding_window=16, max_window_layers=0)
    assert "sliding window" in sharing_refusal(LlavaConfig(text_config=windowed))
    assert "gemma2" in sharing_refusal(LlavaConfig(text_config=Gemma2Config(**small)))
    capped = LlamaConfig(**small)
    capped.attn_logit_softcapping = 50.0
    assert "softcap" in sharing_refusal(LlavaConfig(text_config=capped))


def test_image_chat_and_prm_tag_tokens_are_never_generated(policy):
    tok = policy.processor.tokenizer
    image = tok.convert_tokens_to_ids(policy.processor.image_token)
    assert image in policy.suppress_ids
    # a generated `ки` once shifted every PRM label of its chain (quick run, 90 SFT steps)
    assert {tok.convert_tokens_to_ids(t) for t in ("ки", "к+и", "к-и")} <= set(policy.suppress_ids)
    assert policy.end_ids[0] not in policy.suppress_ids and policy.step_end_id not in policy.suppress_ids


def test_a_seeded_call_draws_from_its_own_stream(policy, test_records):
    """What a seeded call draws depends on its seed alone, not on what the policy drew before it:
    a resumed stage redraws what it would have drawn uninterrupted."""
    params = SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=3)

    def texts(p):
        return [g.text for g in policy.generate(test_records[:2], p)[1]]

    first = texts(params)
    policy.generate(test_records[:3], SamplingParams(n=2, temperature=1.0, max_tokens=8))  # draws on
    assert texts(params) == first
    assert texts(SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=4)) != first


def test_chunks_and_their_seeds_do_not_depend_on_what_ran_before():
    from chainstep.sampling import derived_seed, seeded_chunks

    items = [{"id": f"q{i}"} for i in range(130)]
    chunks = list(seeded_chunks(items, 7, key=lambda r: r["id"], size=64))
    assert [len(c) for c, _ in chunks] == [64, 64, 2]
    assert len({seed for _, seed in chunks}) == 3
    assert chunks == list(seeded_chunks(items, 7, key=lambda r: r["id"], size=64))
    assert derived_seed(None, "q0") is None and derived_seed(7, 0) != derived_seed(7, 1)
    halfway = list(seeded_chunks(items, 7, key=lambda r: r["id"], pending=lambda r: r["id"] == "q70"))
    assert halfway == [chunks[1]]  # a resume redraws the one chunk left, under the same seed


def test_a_chat_models_own_turn_end_stops_generation(tiny_model_dir, test_records, tmp_path):
    """A checkpoint whose turn ends with another token than EOS (Qwen `<|im_end|>`, Llama-3
    `<|eot_id|>`) names it in its generation config; before, it was suppressed as a foreign token."""
    from chainstep import models

    model, processor = models.load(tiny_model_dir("llava"))
    turn_end = processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    model.generation_config.eos_token_id = [processor.tokenizer.eos_token_id, turn_end]
    models.save(model, processor, tmp_path / "chat")
    policy = Policy.from_dir(tmp_path / "chat")
    assert turn_end in policy.end_ids and turn_end not in policy.suppress_ids
    # make the model say the turn end after two tokens
    calls = {"n": 0}

    def favour_turn_end(module, inputs, logits):
        calls["n"] += 1
        if calls["n"] >= 3:
            logits[..., turn_end] += 1e4
        return logits

    policy.model.lm_head.register_forward_hook(favour_turn_end)
    gen = policy.generate(test_records[:1], SamplingParams(max_tokens=20))[0][0]
    assert gen.finish_reason == "stop" and gen.num_tokens == 3
    assert "<end_of_utterance>" not in gen.text


def test_vllm_backend_matches_hf_greedy(sft_model_dir, test_records):
    """Runs where vLLM and a GPU are available; skipped on CPU machines."""
    pytest.importorskip("vllm", reason="vLLM is not installed: its CPU build cannot run LLaVA beside the "
                                       "CPU torch wheel, and its CUDA wheel is too large to carry (README)")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a GPU")
    from chainstep.sampling import load_policy

    params = SamplingParams(max_tokens=48)
    hf = [g[0].text for g in Policy.from_dir(sft_model_dir).generate(test_records[:4], params)]
    fast = [g[0].text for g in load_policy(sft_model_dir, "vllm").generate(test_records[:4], params)]
    assert fast == hf


def test_unknown_backend_is_named():
    from chainstep.errors import ChainstepError
    from chainstep.sampling import load_policy

    with pytest.raises(ChainstepError, match="backend 'tgi': choose hf or vllm"):
        load_policy("unused", "tgi")
