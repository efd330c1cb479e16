"""Every stage's config as a typed dataclass, read from YAML and `key.sub=value` overrides.

The configs live here, not in their stages, so reading or validating one loads no trainer (no
torch, no TRL). The resolved config is saved into the run directory, so a run can be inspected
and resumed. An unknown key is an error that names the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import TypeAdapter, ValidationError

from .errors import ChainstepError
from .scoring import ChainScore

SUITE_FAMILIES = ("count_sum", "bar_chart", "attribute_mc", "measure", "compare_mc")  # chainstep.synthetic
SUITE_BLOCKS = 4  # counted units per image side: 96 px / 12 px patches / 2 patches per unit
HEADS = ("likelihood", "tag")  # the PRM's judging heads (chainstep.prm)
PAIR_SOURCES = ("prm", "prm_answer", "outcome", "verified")  # how DPO ranks sampled chains
GROUND_TRUTH = ("outcome", "verified")  # pair sources that need no PRM
STYLES = ("cos", "cot", "direct")  # how a policy answers: step chains, plain reasoning, the answer alone
REWARDS = ("prm", "outcome", "random")  # GRPO rewards; random is the control for "any update helps"
ADVANTAGES = ("chain", "step")  # GRPO advantages: one per completion, or one per step
STRATEGIES = ("greedy", "sc", "bon", "weighted", "beam", "pass")  # decoding strategies (chainstep.search)
VERIFIER_STRATEGIES = ("bon", "weighted", "beam")  # the strategies that rank by a verifier
DEFAULT_SEARCH_TEMPERATURE = 0.7  # `chainstep eval --strategy`'s; `chainstep run` picks one on val
# keys that moved: an old config gets the new name instead of a bare "unknown key"
MOVED = {"dpo.step_weight": "prm.step_weight", "grpo.step_weight": "prm.step_weight"}


@dataclass
class TrainConfig:
    """Training knobs every trainer shares (SFT, PRM, DPO, GRPO), named as in transformers'
    TrainingArguments; the defaults are SFT's."""

    max_steps: int = 900  # optimizer steps; sets the time budget (~0.39 s/step, tiny model, 2 cores)
    per_device_train_batch_size: int = 16
    learning_rate: float = 1e-3  # 1e-3 for tiny random models; ~1e-5 full / 2e-4 LoRA for real
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 20
    weight_decay: float = 0.0
    save_steps: int = 100  # checkpoint interval, for resume after a kill
    max_length: int = 1024  # tokens per example, prompt included; longer ones are cut
    seed: int = 0
    bf16: bool = False  # faster on recent CPUs/GPUs; fp32 is the reproducible default
    freeze_vision: bool | None = None  # None: freeze a pretrained tower, train one built from scratch
    lora: bool = False  # PEFT LoRA on the language model's projections (for 2B+ models)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05

    def __post_init__(self):
        if self.max_steps <= 0:
            raise ChainstepError(f"max_steps={self.max_steps} must be positive")
        if self.per_device_train_batch_size <= 0:
            raise ChainstepError("per_device_train_batch_size must be positive")


@dataclass
class SFTConfig(TrainConfig):
    """CoS SFT and the direct-answer baseline: the shared training knobs at their defaults.
    fp32: bf16 autocast is 1.34x faster here but lost bar-chart readings (27 vs 13 discordant
    on 998 fresh held-out questions; docs/findings.md). `val_every` records the greedy val
    curve while training, which is how a converged budget is told from one stopped on the slope."""

    max_steps: int = 1800  # val 99.8, 99.6, 99.6 at 1,500-1,800; 3 seeds end within 0.6 (docs/findings.md)
    val_every: int = 150  # steps between greedy val evaluations (0 = none); the last step is always one
    val_questions: int = 0  # val questions each evaluation reads (0 = the whole split)

    def __post_init__(self):
        super().__post_init__()
        if self.val_every < 0 or self.val_questions < 0:
            raise ChainstepError("val_every and val_questions must be >= 0")


@dataclass
class PretrainConfig:
    """Pretraining of a tiny model: its tower learns to see, then its language model to read the
    tower and to add what it reads (`chainstep.pretrain`)."""

    enabled: bool = True  # false: SFT starts from the random tower (the pre-2026-11 default)
    images: int = 40_000  # freshly drawn training images; sets the time (~1 min per 40k, 2 cores)
    batch_size: int = 128
    learning_rate: float = 2e-3
    warmup_steps: int = 20
    save_steps: int = 100  # checkpoint interval, for resume after a kill
    held_out: int = 500  # fresh images for the reported reading accuracy (0 = skip)
    captions: int = 19_200  # fresh images the language model learns to read and add (0 = tower only)
    caption_batch_size: int = 32
    caption_learning_rate: float = 1e-3
    cache: bool = True  # reuse a model pretrained from the same start with the same config
    seed: int = 0

    def __post_init__(self):
        if self.images < self.batch_size:
            raise ChainstepError(f"pretrain.images={self.images} must be at least "
                                 f"pretrain.batch_size={self.batch_size}")
        if self.captions and self.captions < self.caption_batch_size:
            raise ChainstepError(f"pretrain.captions={self.captions} must be 0 or at least "
                                 f"pretrain.caption_batch_size={self.caption_batch_size}")

    @property
    def max_steps(self) -> int:
        return self.images // self.batch_size

    @property
    def caption_steps(self) -> int:
        return self.captions // self.caption_batch_size


@dataclass
class LabelConfig:
    """Which labellers run and how their verdicts become 0/1 labels."""

    questions: int = 160  # training questions whose policy samples get labelled; 0 = all
    samples: int = 4  # chains sampled per question (paper: 16)
    sample_temperature: float = 1.0
    val_questions: int = 200  # held-out questions for the PRM metrics: 150 gave 161-207 pairs
    mc: bool = True  # Monte Carlo rollouts (the costly source)
    judge: bool = True  # judge ratings (programmatic for the synthetic suite)
    rollouts: int = 4  # k per step prefix (paper: 16)
    rule: str = "hard"  # hard: any rollout right; soft: fraction >= threshold
    threshold: float = 0.5
    neutral: str = "bad"  # what a neutral rating becomes: good, bad or drop
    mc_chains: int = 48  # MC-label at most this many sampled chains; 0 = all
    perturbed: int = 1  # teacher chains per question with one error put in, each beside its clean twin
    temperature: float = 1.0  # rollout sampling temperature
    max_tokens: int = 256
    concurrency: int = 8  # judge requests in flight (HTTP judge)
    seed: int = 0

    def __post_init__(self):
        if self.rule not in ("hard", "soft"):
            raise ChainstepError(f"label.rule={self.rule!r} must be hard or soft")
        if self.neutral not in ("good", "bad", "drop"):
            raise ChainstepError(f"label.neutral={self.neutral!r} must be good, bad or drop")
        if self.rollouts < 1:
            raise ChainstepError("label.rollouts must be >= 1")


@dataclass
class PRMConfig(TrainConfig):
    """PRM training knobs (as SFT's) plus how chain scores are formed."""

    init: str = "policy"  # policy; larger: a bigger model of its own (pipeline); or a model dir
    size: str = "medium"  # the larger base's size (models.SIZES), with init=larger
    head: str = "likelihood"  # likelihood (of the step's tokens) or tag (the paper's two-token head)
    label_weight: float = 0.0  # likelihood head: weight of the BCE on labels beside next-token loss
    max_steps: int = 150  # val ranking with the checks: 0.929 at 150, 300 and 900 steps, 0.897 at 75
    learning_rate: float = 5e-4
    bf16: bool = True  # autocast: faster on this CPU
    soft_labels: bool = False  # train on MC values instead of 0/1 (others truncate these silently)
    merge: str = "union"  # label sources: union (every labelled chain) or agree (steps both agree on)
    step_weight: float = ChainScore.step_weight  # chain score = w * agg(steps) + (1 - w) * answer
    aggregate: str = ChainScore.aggregate  # mean, min, last or prod; the trained verifier keeps both
    checks: bool = True  # read with the checks (chainstep.checks), averaged with the PRM's scores
    choose_on_val: bool = True  # the run scores with PRM + checks, checks or PRM: the best val ranking

    def __post_init__(self):
        super().__post_init__()
        ChainScore(self.step_weight, self.aggregate)  # raises on a bad rule
        if self.merge not in ("union", "agree"):
            raise ChainstepError(f"prm.merge={self.merge!r} must be union or agree")
        check_head(self.head)
        if self.label_weight < 0:
            raise ChainstepError(f"prm.label_weight={self.label_weight} must be >= 0")

    @property
    def scoring(self) -> ChainScore:
        """The chain-score rule this verifier is trained to be read with."""
        return ChainScore(self.step_weight, self.aggregate, "verifier")


@dataclass
class SearchConfig:
    """What `chainstep run` searches with, and on how many test questions."""

    ns: tuple[int, ...] = (1, 2, 4, 8, 16)  # N for pass@N, SC, BoN and weighted vote
    beam_ns: tuple[int, ...] = (16,)  # N for beam search (each N is a full run)
    split: str = "test"  # the split searched (its greedy answers are the baseline)
    questions: int = 200  # questions of that split searched; 0 = the whole split
    temperatures: tuple[float, ...] = (0.3, 0.7, 1.0)  # tried on val; the best BoN picks one
    val_questions: int = 40  # val questions for the temperature choice
    keep: int = 1  # beams kept per question (k); 1 is the paper's setting
    step_tokens: int = 96  # new-token cap for one step
    max_steps: int = 10  # steps before a beam is cut off
    step_weights: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # BoN ablation at max N
    final_beam: bool = False  # beam search on the last DPO model too (~5 min here; study.yaml: on)

    def __post_init__(self):
        for name in ("ns", "beam_ns", "temperatures", "step_weights"):
            setattr(self, name, tuple(getattr(self, name)))
        if any(n < 1 for n in self.ns + self.beam_ns) or self.keep < 1:
            raise ChainstepError("search: every N and keep must be >= 1")
        if any(t <= 0 for t in self.temperatures):
            raise ChainstepError("search.temperatures must be > 0 (sampling)")


@dataclass
class DPOConfig(TrainConfig):
    """Rounds, pair building and DPO knobs; training knobs as in TrainConfig."""

    rounds: int = 2  # configs/study.yaml runs 3
    questions: int = 96  # train questions sampled per round (taken after those the PRM saw)
    samples: int = 16  # chains per question per round (the paper's 16)
    temperature: float = 1.0
    max_tokens: int = 256
    pair_source: str = "prm"  # prm (the verifier's chain score), prm_answer, outcome, verified (step truth)
    ablation: tuple[str, ...] = ()  # sources also tried in round 1 (study.yaml: outcome, verified, ...)
    threshold: float = 0.05  # minimum score gap between chosen and rejected
    pairs_per_question: int = 2  # i-th best vs i-th worst, while the gap holds
    pairs: str = "chain"  # chain: whole chains; step: at the first wrong step, shared steps as prompt
    min_pairs: int = 8  # fewer is too little to change the model: the round trains nothing, says so
    beta: float = 0.1
    sft_weight: float = 1.0  # NLL on the chosen chain (TRL loss_type ["sigmoid", "sft"])
    max_steps: int = 60  # at most; fewer when `epochs` over the pairs is reached first
    epochs: float = 2.0  # passes over a round's pairs: more overfits a few dozen pairs and breaks the format
    per_device_train_batch_size: int = 8
    learning_rate: float = 1e-5  # >= 3e-5 lowered val accuracy, 1e-4 by 14 points (docs/findings.md)
    warmup_steps: int = 5
    save_steps: int = 12
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if any(s not in PAIR_SOURCES for s in (self.pair_source, *self.ablation)):
            raise ChainstepError(f"dpo.pair_source and dpo.ablation must be among {PAIR_SOURCES}")
        if self.pairs not in ("chain", "step"):
            raise ChainstepError(f"dpo.pairs={self.pairs!r} must be chain or step")
        if self.pairs == "step" and self.pair_source != "verified":
            raise ChainstepError("dpo.pairs=step ranks chains by step truth: set dpo.pair_source=verified")
        if self.rounds < 1 or self.samples < 2:
            raise ChainstepError("dpo.rounds must be >= 1 and dpo.samples >= 2 (pairs need two chains)")
        if self.epochs <= 0:
            raise ChainstepError(f"dpo.epochs={self.epochs} must be positive")
        if self.threshold < 0:
            raise ChainstepError(f"dpo.threshold={self.threshold} must be >= 0")


@dataclass
class GRPOConfig(TrainConfig):
    """Reward, advantage and sampling knobs; training knobs as in TrainConfig."""

    reward: str = "prm"  # prm: PRM chain score; outcome: 1 if the answer is right
    advantages: str = "chain"  # chain: one per completion (TRL); step: per-step PRM advantages
    format_weight: float = 0.0  # weight of a 0/1 reward for a parseable step chain
    runs: tuple[str, ...] = ("prm", "outcome")  # what `chainstep run` trains: reward[-step] (+ study.yaml)
    reasoning_modes: bool = False  # the paper's ablation: outcome GRPO from base and a plain-reasoning SFT
    questions: int = 32  # train questions (taken after those the PRM and DPO saw)
    num_generations: int = 8  # completions per prompt (the group)
    temperature: float = 1.0
    max_tokens: int = 192
    beta: float = 0.0  # KL to the start model; 0 loads no reference model
    max_steps: int = 16
    per_device_train_batch_size: int = 16  # completions per step: 2 prompts x 8
    learning_rate: float = 1e-5  # as DPO: 1e-4 lowered accuracy (docs/findings.md)
    warmup_steps: int = 2
    save_steps: int = 4

    def __post_init__(self):
        super().__post_init__()
        if self.reward not in REWARDS:
            raise ChainstepError(f"grpo.reward={self.reward!r} must be one of {REWARDS}")
        if self.advantages not in ADVANTAGES:
            raise ChainstepError(f"grpo.advantages={self.advantages!r} must be one of {ADVANTAGES}")
        if self.advantages == "step" and self.reward != "prm":
            raise ChainstepError("grpo.advantages=step needs grpo.reward=prm (step scores come from the PRM)")
        for run in self.runs:
            if run.removesuffix("-step") not in REWARDS:
                raise ChainstepError(f"grpo.runs: {run!r} is not one of prm, outcome, random, prm-step")
        if self.per_device_train_batch_size % self.num_generations:
            raise ChainstepError("grpo.per_device_train_batch_size must be a multiple of "
                                 "grpo.num_generations")


def check_strategy(strategy: str, has_verifier: bool) -> None:
    """A strategy the CLI, search and the server all accept the same way: known, and given a
    verifier where it ranks by one."""
    if strategy not in STRATEGIES:
        raise ChainstepError(f"strategy {strategy!r}: choose from {', '.join(STRATEGIES)}")
    if strategy in VERIFIER_STRATEGIES and not has_verifier:
        raise ChainstepError(f"strategy {strategy!r} needs a PRM (--prm DIR)")


def check_style(style: str, strategy: str = "greedy") -> None:
    """A policy style every caller accepts the same way; search samples step chains, so a policy
    of another style is evaluated greedily."""
    if style not in STYLES:
        raise ChainstepError(f"style {style!r}: choose one of {', '.join(STYLES)}")
    if style != "cos" and strategy != "greedy":
        raise ChainstepError(f"strategy {strategy!r} searches over step chains; a {style} policy "
                             "is evaluated with greedy")


def check_head(head: str) -> None:
    if head not in HEADS:
        raise ChainstepError(f"prm.head={head!r} must be one of {HEADS}")


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
    batch_size: int = 128  # sequences per generate call (and PRM forward); 128 is fastest on 2 cores
    max_tokens: int = 256  # new tokens per response
    splits: tuple[str, ...] = ("test",)


@dataclass
class SuiteConfig:
    """Size and difficulty of the suite. Knobs: `max_objects` per image, `terms` groups read,
    `operands` groups a sum adds."""

    train: int = 3000
    val: int = 500  # the val curve and every decision: ~500 resolve a few points
    test: int = 1000  # reported only; a paired test on 1,000 questions sees ~3 points (McNemar, 80%)
    families: tuple[str, ...] = SUITE_FAMILIES
    max_objects: int = 8  # shapes per image in counting families (3..max_objects)
    terms: int = 3  # difficulty: terms + 1 colour groups are read (2: 4 or 5 steps; 3: one more)
    operands: int = 2  # difficulty: groups a sum adds (differences take two), up to terms + 1
    seed: int = 0

    def __post_init__(self):
        self.families = tuple(self.families)
        unknown = [f for f in self.families if f not in SUITE_FAMILIES]
        if unknown:
            raise ChainstepError(f"unknown task families {unknown}; choose from {sorted(SUITE_FAMILIES)}")
        if self.terms not in (2, 3):
            raise ChainstepError(f"terms={self.terms} must be 2 or 3")
        if not 2 <= self.operands <= self.terms + 1:
            raise ChainstepError(f"operands={self.operands} must be in 2..{self.terms + 1} "
                                 f"(terms={self.terms} reads {self.terms + 1} colour groups)")
        if not self.terms + 2 <= self.max_objects <= SUITE_BLOCKS * SUITE_BLOCKS:
            raise ChainstepError(f"max_objects={self.max_objects} must be in "
                                 f"{self.terms + 2}..{SUITE_BLOCKS * SUITE_BLOCKS} "
                                 f"(terms={self.terms} needs {self.terms + 1} colour groups)")


@dataclass
class FilterConfig:
    """Bounds a teacher chain must meet; 0 turns a bound off."""

    min_steps: int = 1
    max_steps: int = 8
    max_field_chars: int = 300


@dataclass
class ServeConfig:
    """Limits that keep one request from taking the server down; defaults suit a single GPU."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    name: str | None = None  # model id clients send [default: the model folder's name]
    max_n: int = 16
    max_tokens: int = 2048
    max_image_bytes: int = 20_000_000
    max_body_bytes: int = 32_000_000  # refused (413) before the JSON is parsed
    max_image_pixels: int = 40_000_000
    batch_window_ms: float = 5.0
    max_batch: int = 32
    max_steps: int = 12  # streamed or beam-searched steps before the answer is forced


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
    seed: int = 0  # the run's draw: offsets every training and sampling seed (not the suite, not the tower)
    seeds: int = 1  # `chainstep run` trains and samples under seeds seed..seed+seeds-1 (OUT/seed-k)

    SEEDED = ("sft", "base_sft", "label", "prm", "dpo", "grpo")

    def seeded(self) -> RunConfig:
        """The stage configs this run trains and samples with: each stage's own `seed` moved by
        `SEED_STRIDE * seed`, so seed 0 is the configs as written and two run seeds share no
        stage seed. The suite, the tiny model's init and its pretrained tower stay: a seed redraws
        what a user would redraw starting from one pretrained checkpoint."""
        moved = {name: dataclasses.replace(getattr(self, name),
                                           seed=getattr(self, name).seed + SEED_STRIDE * self.seed)
                 for name in self.SEEDED}
        return dataclasses.replace(self, **moved)


SEED_STRIDE = 1000


QUICK: dict[str, object] = {
    "suite.train": 400, "suite.val": 40, "suite.test": 30,
    "suite.terms": 2,  # 80 steps learn the format of the shorter chains (terms 3: 73% unparsed)
    "sft.max_steps": 80, "sft.save_steps": 40, "base_sft.max_steps": 12,
    "model.vocab_size": 512, "pretrain.images": 6400, "pretrain.held_out": 128,
    "pretrain.captions": 0,  # 20 caption steps left 63% of the 80-step SFT's chains unparsed
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
        if where + key in MOVED:
            raise ChainstepError(f"config key {where + key!r} is now {MOVED[where + key]!r}, set when "
                                 "the verifier is trained (it carries the rule search, DPO, GRPO and the "
                                 "server read); to override it here, pass --step-weight / --aggregate")
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
    from .records import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(_plain(to_dict(cfg)), sort_keys=False))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


__all__ = ["RunConfig", "ModelConfig", "EvalConfig", "TrainConfig", "SFTConfig", "PretrainConfig",
           "LabelConfig", "PRMConfig", "SearchConfig", "DPOConfig", "GRPOConfig", "load_config",
           "dump_config", "parse_overrides", "section_config", "QUICK"]
