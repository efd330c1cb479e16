"""Tiny VLMs built from config, any local HF VLM loaded from disk, and the 17 step tokens.

Everything downstream sees a model directory in the standard Hugging Face layout
(`save_pretrained`, safetensors only) and loads it with `AutoModelForImageTextToText` +
`AutoProcessor`, so a tiny random model and a real checkpoint take the same path.

Tiny models use real transformers architectures (Llava, LLaVA-NeXT, Qwen2-VL, Idefics3,
InternVL) with random init and a byte-level BPE tokenizer trained on the suite's text.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)
from transformers.utils import is_torchvision_available
from transformers.utils import logging as hf_logging

from .errors import ChainstepError
from .layout import MODEL_SUMMARY
from .records import write_json
from .steps import SPECIAL_TOKENS, TOKEN_DESCRIPTIONS

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
# Image markers of every supported architecture, so one tokenizer serves them all.
IMAGE_TOKENS = (
    "<image>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>",
    "<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
    "<img>", "</img>", "<IMG_CONTEXT>", "<video>",
)
IMAGE_SIZE = 96
hf_logging.disable_progress_bar()  # "Loading weights" bars would break up chainstep's own progress lines


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int


SIZES: dict[str, Size] = {
    "tiny": Size(hidden=192, layers=4, heads=4, vision_hidden=96, vision_layers=2, vision_heads=2),
    "medium": Size(hidden=256, layers=4, heads=4, vision_hidden=96, vision_layers=2, vision_heads=2),
    "small": Size(hidden=320, layers=6, heads=5, vision_hidden=192, vision_layers=4,
                  vision_heads=4),
}


def train_tokenizer(texts: list[str], vocab_size: int = 1024,
                    with_step_tokens: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE on the given texts. Every number below 100 is one token, so a sum or a
    difference is one prediction rather than a carry across digit tokens."""
    special = [PAD, BOS, EOS, *IMAGE_TOKENS] + (list(SPECIAL_TOKENS) if with_step_tokens else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    # the chat template's own words, so prompts do not spell them out byte by byte
    numbers = " ".join(map(str, range(100)))
    tok.train_from_iterator([*texts, *["user: assistant:\n"] * 100, *[numbers] * 100], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
        extra_special_tokens={
            "start_image_token": "<img>", "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>",
        },
    )


def chat_template(image_placeholder: str) -> str:
    """A minimal chat template: `user: <image> question` then `assistant:` on its own line."""
    return (
        "{% for m in messages %}{% if m['role'] == 'user' %}" + BOS + "user:"
        "{% if m['content'] is string %} {{ m['content'] }}{% else %}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}" + image_placeholder +
        "{% elif c['type'] == 'text' %} {{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
        "{{ '\\n' }}{% elif m['role'] == 'assistant' %}assistant:{{ '\\n' }}"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}" + EOS +
        "{{ '\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant:{{ '\\n' }}{% endif %}"
    )


def _text_config(kind: str, tok: PreTrainedTokenizerFast, s: Size, **extra) -> dict:
    return dict(
        model_type=kind, vocab_size=len(tok), hidden_size=s.hidden, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.heads,
        intermediate_size=s.hidden * 3, max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False, **extra,
    )


def _vision_config(kind: str, s: Size, patch: int, **extra) -> dict:
    return dict(
        model_type=kind, hidden_size=s.vision_hidden, num_hidden_layers=s.vision_layers,
        num_attention_heads=s.vision_heads, intermediate_size=s.vision_hidden * 2,
        image_size=IMAGE_SIZE, patch_size=patch, **extra,
    )


def _image_kwargs() -> dict:
    return dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def _without_video(cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """`cls` minus its video processor, which cannot be built without torchvision.

    Qwen2-VL and InternVL processors insist on one; torchvision is broken beside the CPU torch
    wheel. The subclass keeps the class name, so the saved layout is the standard one.
    """
    if "video_processor" not in cls.get_attributes() or is_torchvision_available():
        return cls

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        cls.__init__(self, image_processor=image_processor, tokenizer=tokenizer,
                     video_processor=None, chat_template=chat_template, **kwargs)

    signature = inspect.signature(cls.__init__)
    __init__.__signature__ = signature.replace(parameters=[
        p for name, p in signature.parameters.items() if name != "video_processor"])
    return type(cls.__name__, (cls,), {"__init__": __init__})


def load_processor(path: str | Path) -> ProcessorMixin:
    """`AutoProcessor`, or the same class without its video part where torchvision is missing."""
    try:
        return AutoProcessor.from_pretrained(path)
    except OSError as err:
        if "video processor" not in str(err) or is_torchvision_available():
            raise
    config = json.loads((Path(path) / "processor_config.json").read_text())
    cls = _without_video(getattr(transformers, config["processor_class"]))
    processor = cls.from_pretrained(path)
    # from_pretrained only passes the arguments it sees in __init__'s code, not its signature
    for key, value in config.items():
        if key not in cls.get_attributes() and isinstance(getattr(processor, key, None), int):
            setattr(processor, key, value)
    return processor


def _build_llava(tok, s: Size, next_: bool = False):
    """Llava, or LLaVA-NeXT (`next_`) whose any-res grid is pinned to the one image size."""
    import transformers as tf

    patch = 12
    grid = {"image_grid_pinpoints": [[IMAGE_SIZE, IMAGE_SIZE]]} if next_ else {}
    name = "LlavaNext" if next_ else "Llava"
    config = getattr(tf, f"{name}Config")(
        text_config=_text_config("llama", tok, s),
        vision_config=_vision_config("clip_vision_model", s, patch, projection_dim=s.hidden),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, image_seq_length=(IMAGE_SIZE // patch) ** 2, **grid,
    )
    image_processor = getattr(tf, "LlavaNextImageProcessorPil" if next_ else "CLIPImageProcessorPil")(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        **grid, **_image_kwargs())
    processor = getattr(tf, f"{name}Processor")(
        image_processor=image_processor, tokenizer=tok, patch_size=patch,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=chat_template("<image>"))
    return getattr(tf, f"{name}ForConditionalGeneration")(config), processor


def _build_llava_next(tok, s: Size):
    return _build_llava(tok, s, next_=True)


def _build_qwen2_vl(tok, s: Size):
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
        Qwen2VLProcessor,
    )

    patch, merge = 12, 2
    head_dim = s.hidden // s.heads
    quarter = head_dim // 4
    text = _text_config("qwen2_vl_text", tok, s, rope_scaling={
        "type": "mrope", "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter]})
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=dict(depth=s.vision_layers, embed_dim=s.vision_hidden, hidden_size=s.hidden,
                           num_heads=s.vision_heads, mlp_ratio=2, patch_size=patch,
                           spatial_merge_size=merge, temporal_patch_size=1, in_channels=3),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )
    pixels = IMAGE_SIZE * IMAGE_SIZE
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch, merge_size=merge, temporal_patch_size=1,
        size={"shortest_edge": pixels, "longest_edge": pixels}, **_image_kwargs())
    processor = _without_video(Qwen2VLProcessor)(
        image_processor=image_processor, tokenizer=tok,
        chat_template=chat_template("<|vision_start|><|image_pad|><|vision_end|>"))
    return Qwen2VLForConditionalGeneration(config), processor


def _build_idefics3(tok, s: Size):
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    patch, scale = 12, 2
    seq_len = (IMAGE_SIZE // patch // scale) ** 2
    config = Idefics3Config(
        text_config=_text_config("llama", tok, s),
        vision_config=_vision_config("idefics3_vision", s, patch),
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=scale,
    )
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE}, **_image_kwargs())
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tok, image_seq_len=seq_len,
        chat_template=chat_template("<image>"))
    return Idefics3ForConditionalGeneration(config), processor


def _build_internvl(tok, s: Size):
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
    )

    patch = 12
    seq_len = (IMAGE_SIZE // patch // 2) ** 2
    config = InternVLConfig(
        text_config=_text_config("qwen2", tok, s),
        vision_config=dict(hidden_size=s.vision_hidden, num_hidden_layers=s.vision_layers,
                           num_attention_heads=s.vision_heads,
                           intermediate_size=s.vision_hidden * 2,
                           image_size=[IMAGE_SIZE, IMAGE_SIZE], patch_size=[patch, patch]),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=seq_len,
        tie_word_embeddings=False,
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_to_patches=False, **_image_kwargs())
    processor = _without_video(InternVLProcessor)(
        image_processor=image_processor, tokenizer=tok, image_seq_length=seq_len,
        chat_template=chat_template("<IMG_CONTEXT>"))
    return InternVLForConditionalGeneration(config), processor


ARCHITECTURES = {
    "llava": _build_llava,
    "llava_next": _build_llava_next,
    "qwen2_vl": _build_qwen2_vl,
    "idefics3": _build_idefics3,
    "internvl": _build_internvl,
}


def build_tiny(arch: str, tokenizer: PreTrainedTokenizerFast, size: str = "tiny",
               seed: int = 0) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A randomly initialised VLM of a real architecture, with a processor that fits it."""
    if arch not in ARCHITECTURES:
        raise ChainstepError(f"unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")
    if size not in SIZES:
        raise ChainstepError(f"unknown model size {size!r}; choose from {sorted(SIZES)}")
    torch.manual_seed(seed)
    model, processor = ARCHITECTURES[arch](tokenizer, SIZES[size])
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model, processor


def save(model: PreTrainedModel, processor: ProcessorMixin, path: str | Path,
         meta: dict | None = None) -> Path:
    """Standard HF layout with safetensors weights; `chainstep.json` records how it was made."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    if meta is not None:
        write_json(path / MODEL_SUMMARY, meta)
    return path


def load(path: str | Path, dtype: torch.dtype = torch.float32,
         device: str | None = None) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load any local VLM directory; weights are read from safetensors only, never unpickled."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise ChainstepError(f"{path} is not a model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise ChainstepError(f"{path} has no .safetensors weights; convert the checkpoint first "
                             "(chainstep never loads pickled weights)")
    check_weights(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, use_safetensors=True)
    processor = load_processor(path)
    if getattr(processor, "chat_template", None) is None:
        raise ChainstepError(f"{path} has no chat template on its processor; add one "
                             "(chat_template.jinja) so prompts can be built")
    return model.to(device or default_device()), processor


def check_weights(path: Path) -> None:
    """Every weights file's header, read before loading: a truncated or damaged file is one line
    naming it, not a traceback from deep inside the loader."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(file, "pt"):
                pass
        except SafetensorError as err:
            raise ChainstepError(f"{file}: damaged weights file ({str(err).lower()}); save or copy "
                                 "the model again") from None


def default_device() -> str:
    """The GPU when there is one: generation and scoring run where training does."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_step_tokens(model: PreTrainedModel, processor: ProcessorMixin) -> list[str]:
    """Add the missing step tokens; new rows start at the mean embedding of their description.

    Returns the tokens that were added (none if the tokenizer already had them all).
    """
    tok = processor.tokenizer
    missing = [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]
    if not missing:
        return []
    descriptions = {t: tok(TOKEN_DESCRIPTIONS[t], add_special_tokens=False)["input_ids"]
                    for t in missing}
    tok.add_special_tokens({"additional_special_tokens": missing},
                           replace_extra_special_tokens=False)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        for matrix in _embedding_matrices(model):
            for token, ids in descriptions.items():
                matrix[tok.convert_tokens_to_ids(token)] = matrix[ids].mean(dim=0)
    return missing


def _embedding_matrices(model: PreTrainedModel) -> list[torch.Tensor]:
    inputs = model.get_input_embeddings().weight
    outputs = model.get_output_embeddings()
    if outputs is None or outputs.weight.data_ptr() == inputs.data_ptr():
        return [inputs]
    return [inputs, outputs.weight]


def count_parameters(model: PreTrainedModel) -> int:
    return sum(p.numel() for p in model.parameters())
