import json

import pytest
import torch

from chainstep import models
from chainstep.errors import ChainstepError
from chainstep.inputs import collate, encode_prompt
from chainstep.steps import SPECIAL_TOKENS, TOKEN_DESCRIPTIONS

ARCHS = sorted(models.ARCHITECTURES)


def _logits(model, processor, record):
    batch = collate([encode_prompt(processor, record)], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch, tiny_model_dir, train_records):
    path = tiny_model_dir(arch)
    assert (path / "model.safetensors").exists()
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))
    model, processor = models.load(path)
    again, processor2 = models.load(path)
    assert type(model).__name__.lower().startswith(arch.replace("_", ""))
    record = train_records[0]
    assert torch.equal(_logits(model, processor, record), _logits(again, processor2, record))


def test_tokenizer_has_step_tokens_as_single_ids(tiny_model_dir):
    _, processor = models.load(tiny_model_dir("llava"))
    tok = processor.tokenizer
    for token in SPECIAL_TOKENS:
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1
    text = "<|answer_start|>12<|answer_end|>\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_sizes_differ(tokenizer_texts):
    tok = models.train_tokenizer(tokenizer_texts, vocab_size=400)
    tiny = models.count_parameters(models.build_tiny("llava", tok, "tiny")[0])
    small = models.count_parameters(models.build_tiny("llava", tok, "small")[0])
    assert small > 3 * tiny


def test_add_step_tokens_uses_description_mean(tiny_model_dir, tmp_path):
    model, processor = models.load(tiny_model_dir("llava", step_tokens=False))
    tok = processor.tokenizer
    assert "ки" not in tok.get_vocab()
    before = model.get_input_embeddings().weight.detach().clone()
    descriptions = {t: tok(TOKEN_DESCRIPTIONS[t], add_special_tokens=False)["input_ids"]
                    for t in SPECIAL_TOKENS}
    added = models.add_step_tokens(model, processor)
    assert added == list(SPECIAL_TOKENS)
    models.save(model, processor, tmp_path / "m")
    model, processor = models.load(tmp_path / "m")
    tok = processor.tokenizer
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings().weight
    for token in SPECIAL_TOKENS:
        ids = tok(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1
        expected = before[descriptions[token]].mean(dim=0)
        assert torch.allclose(emb[ids[0]], expected, atol=1e-6)
        assert out[ids[0]].abs().sum() > 0
    assert models.add_step_tokens(model, processor) == []


def test_add_tokens_cli(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from chainstep.cli import app

    result = CliRunner().invoke(app, ["add-tokens", str(tiny_model_dir("qwen2_vl", False)),
                                      str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "added 17 tokens" in result.output
    assert json.loads((tmp_path / "out" / "chainstep.json").read_text())["added_tokens"]
    _, processor = models.load(tmp_path / "out")
    assert "<|reasoning_step_end|>" in processor.tokenizer.get_vocab()


def test_load_refuses_pickles_and_non_models(tmp_path, tiny_model_dir):
    with pytest.raises(ChainstepError, match="not a model directory"):
        models.load(tmp_path)
    src = tiny_model_dir("llava")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json",
                 "chat_template.jinja"):
        if (src / name).exists():
            (tmp_path / name).write_bytes((src / name).read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ChainstepError, match="no .safetensors weights"):
        models.load(tmp_path)


def test_unknown_arch_and_size(tokenizer_texts):
    tok = models.train_tokenizer(tokenizer_texts[:10], vocab_size=300)
    with pytest.raises(ChainstepError, match="unknown architecture"):
        models.build_tiny("gpt", tok)
    with pytest.raises(ChainstepError, match="unknown model size"):
        models.build_tiny("llava", tok, "huge")


def test_chat_template_puts_image_before_question(tiny_model_dir):
    _, processor = models.load(tiny_model_dir("llava"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<s>user:<image> Q?\nassistant:\n"


def test_a_damaged_weights_file_is_one_line_naming_it(tmp_path, tiny_model_dir, suite_dir):
    import shutil

    from typer.testing import CliRunner

    from chainstep.cli import app

    damaged = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llava"), damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])  # a copy cut short
    with pytest.raises(ChainstepError, match=r"model\.safetensors: damaged weights file"):
        models.load(damaged)
    result = CliRunner().invoke(app, ["eval", str(damaged), str(suite_dir / "tasks" / "test.jsonl"),
                                      "--out", str(tmp_path / "eval"), "--limit", "2"])
    assert result.exit_code == 1 and "damaged weights file" in str(result.exception)
    assert "Traceback" not in result.output
