"""Stage configs as dataclasses, read from YAML and `key.sub=value` overrides.

The resolved config is saved into the run directory, so a run can be inspected and resumed.
An unknown key is an error that names the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import TypeAdapter, ValidationError

from .construct import FilterConfig
from .dpo import DPOConfig
from .errors import ChainstepError
from .grpo import GRPOConfig
from .label import LabelConfig
from .pretrain import PretrainConfig
from .prm import PRMConfig
from .search import SearchConfig
from .synthetic import SuiteConfig
from .train_sft import SFTConfig


@dataclass
class ModelConfig:
    """The starting VLM: a local HF model directory, or a tiny one built from config."""

    path: str | None = None  # local model dir (any HF VLM); None builds a tiny random model
    arch: str = "llava"  # tiny builds: llava, llava_next, qwen2_vl, idefics3, internvl
    size: str = "tiny"  # tiny (~2.3M params) or small (~10M)
    vocab_size: int = 1024  # tokenizer trained on the suite's text (tiny builds only)
    seed: int = 0


@dataclass
class EvalConfig:
    batch_size: int = 64  # sequences per generate call
    max_tokens: int = 256  # new tokens per response
    splits: tuple[str, ...] = ("test",)


@dataclass
class RunConfig:
    """Everything `chainstep run` does; `configs/tiny.yaml` holds the same defaults."""

    suite: SuiteConfig = field(default_factory=SuiteConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    base_sft: SFTConfig = field(default_factory=SFTConfig)  # as many steps as CoS SFT
    eval: EvalConfig = field(default_factory=EvalConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    prm: PRMConfig = field(default_factory=PRMConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    threads: int = 2  # torch threads; 2 = all cores on the reference machine


QUICK: dict[str, object] = {
    "suite.train": 400, "suite.val": 40, "suite.test": 30,
    "sft.max_steps": 80, "sft.save_steps": 40, "base_sft.max_steps": 12,
    "model.vocab_size": 512, "pretrain.images": 6400, "pretrain.held_out": 128,
    "label.questions": 24, "label.samples": 3, "label.val_questions": 8, "label.mc_chains": 8,
    "prm.max_steps": 8, "prm.save_steps": 4,
    "search.questions": 6, "search.ns": [1, 4], "search.beam_ns": [2],
    "search.temperatures": [1.0], "search.val_questions": 8,
    "dpo.questions": 6, "dpo.samples": 4, "dpo.threshold": 0.0,
    # the quick model's chains rarely parse at T=1.0, and a chosen chain must parse
    "dpo.temperature": 0.5, "dpo.max_steps": 2, "dpo.save_steps": 2,
    "dpo.per_device_train_batch_size": 4, "dpo.ablation": ["outcome"], "dpo.min_pairs": 1,
    "grpo.questions": 4, "grpo.num_generations": 4, "grpo.per_device_train_batch_size": 8,
    "grpo.max_steps": 1, "grpo.save_steps": 1, "grpo.max_tokens": 64,
}


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, data: dict | None, where: str = ""):
    """Build dataclass `cls` from nested dicts over its defaults, rejecting unknown keys.

    A nested section keeps the defaults of its parent's field (`base_sft` has its own
    `max_steps`), so overriding one key of it leaves the others alone.
    """
    data = data or {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            _unknown(where + key, list(fields), where)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            if value is not None and not isinstance(value, (dict, kind)):
                raise ChainstepError(f"config key {where + name!r} is a section; set its keys "
                                     f"({where + name}.KEY=VALUE), not {value!r}")
            if not isinstance(value, kind):
                default = _shallow(fields[name].default_factory())
                value = from_dict(kind, {**default, **(value or {})}, f"{where}{name}.")
        else:
            value = _typed(where + name, kind, value)
        kwargs[name] = value
    return cls(**kwargs)


def _typed(key: str, kind, value):
    """`value` as the field's type: unambiguous conversions only ("2e-4" -> 0.0002, a single
    value -> a one-item tuple); anything else is an error naming the key, value and type."""
    if _is_sequence(kind) and not isinstance(value, (list, tuple)):
        value = [value]
    try:
        return TypeAdapter(kind).validate_python(value)
    except ValidationError as err:
        raise ChainstepError(f"config key {key!r}: {value!r} is not a valid {_type_name(kind)} "
                             f"({err.errors()[0]['msg'].lower()})") from None


def _is_sequence(kind) -> bool:
    return typing.get_origin(kind) in (tuple, list) or kind in (tuple, list)


def _type_name(kind) -> str:
    return kind.__name__ if isinstance(kind, type) else str(kind).replace("typing.", "")


def _shallow(instance) -> dict:
    return {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)}


def _unknown(key: str, valid: list[str], prefix: str) -> None:
    near = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    hint = f"; did you mean '{prefix}{near[0]}'?" if near else ""
    raise ChainstepError(f"unknown config key {key!r}{hint} Valid: {', '.join(valid)}")


def set_path(data: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        data = data.setdefault(key, {})
        if not isinstance(data, dict):
            raise ChainstepError(f"config key {dotted!r}: {key!r} is not a section")
    data[keys[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, object]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ChainstepError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw)
    return out


def section_config(cls, items: list[str], section: str):
    """A stage command's `--set` items as its section's config: `max_steps=5` and
    `sft.max_steps=5` mean the same in `chainstep sft`, as in `chainstep run`."""
    data = {}
    for key, value in parse_overrides(items).items():
        head, dot, rest = key.partition(".")
        if dot and head == section:
            key = rest
        elif dot and head in {f.name for f in dataclasses.fields(RunConfig)}:
            raise ChainstepError(f"--set {key}: this command reads the {section!r} section "
                                 f"(write {section}.KEY=VALUE or KEY=VALUE)")
        set_path(data, key, value)
    return from_dict(cls, data, f"{section}.")


def load_config(path: str | Path | None = None, overrides: dict[str, object] | None = None,
                quick: bool = False) -> RunConfig:
    """Defaults <- YAML file <- --quick profile <- command-line overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ChainstepError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
    for key, value in {**(QUICK if quick else {}), **(overrides or {})}.items():
        set_path(data, key, value)
    return from_dict(RunConfig, data)


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(_plain(to_dict(cfg)), sort_keys=False))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


__all__ = ["RunConfig", "ModelConfig", "EvalConfig", "load_config", "dump_config",
           "parse_overrides", "section_config", "QUICK"]
