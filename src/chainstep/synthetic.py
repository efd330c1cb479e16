"""The synthetic visual reasoning suite: the embedded default data, drawn with Pillow.

Five families shaped after the paper's benchmarks, each question needing 2-5 steps that read
facts off the image and combine them. Every record keeps its scene and the ground-truth value
of every step in `meta`, so the programmatic teacher can write chains and a judge can check them.

Step facts name the quantity before its value ("Blue shapes: 3"): a tiny model only learns to
read a value once the words saying what is read come first (NOTES.md).

    chainstep tasks make --out tasks/ --train 2000 --val 200 --test 300
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from .errors import ChainstepError

IMAGE_SIZE = 96
COLOURS = {
    "red": (220, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 195, 20),
}
SHAPES = ("circle", "square", "triangle")
LETTERS = "ABCD"
SPLITS = ("train", "val", "test")


@dataclass
class SuiteConfig:
    """Size and difficulty of the suite. Knobs: `max_objects` per image, `terms` read per question."""

    train: int = 2000
    val: int = 200
    test: int = 300
    families: tuple[str, ...] = ("count_sum", "bar_chart", "attribute_mc", "measure", "compare_mc")
    max_objects: int = 8  # shapes per image in counting families (3..max_objects)
    terms: int = 2  # quantities combined per arithmetic question (2 or 3): 3 or 4 steps
    seed: int = 0

    def __post_init__(self):
        self.families = tuple(self.families)
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown:
            raise ChainstepError(f"unknown task families {unknown}; choose from {sorted(FAMILIES)}")
        if not 3 <= self.max_objects <= 12:
            raise ChainstepError(f"max_objects={self.max_objects} must be in 3..12")
        if self.terms not in (2, 3):
            raise ChainstepError(f"terms={self.terms} must be 2 or 3")


@dataclass
class Scene:
    """What a family draws and asks; `steps` holds (name, key, value) with thought `key: value`."""

    image: Image.Image
    question: str
    answer: str
    steps: list[dict]
    facts: dict
    options: list[str] | None = None
    kind: str = "numeric"
    extra: dict = field(default_factory=dict)


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    return image, ImageDraw.Draw(image)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int],
                colour: str) -> None:
    fill = COLOURS[colour]
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _place(rng: random.Random, n: int, cells: int = 4) -> list[tuple[int, int, int, int]]:
    """n non-overlapping boxes on a cells x cells grid, jittered inside their cell."""
    size = IMAGE_SIZE // cells
    slots = rng.sample(range(cells * cells), n)
    boxes = []
    for slot in slots:
        cx, cy = (slot % cells) * size, (slot // cells) * size
        side = rng.randint(size // 2 + 2, size - 4)
        dx, dy = rng.randint(1, size - side - 1), rng.randint(1, size - side - 1)
        boxes.append((cx + dx, cy + dy, cx + dx + side, cy + dy + side))
    return boxes


def _shape_scene(rng: random.Random, counts: dict[str, int]) -> tuple[Image.Image, list[dict]]:
    image, draw = _canvas()
    colours = [c for c, k in counts.items() for _ in range(k)]
    objects = []
    for colour, box in zip(colours, _place(rng, len(colours))):
        kind = rng.choice(SHAPES)
        _draw_shape(draw, kind, box, colour)
        objects.append({"colour": colour, "shape": kind, "box": list(box)})
    return image, objects


def _arith(values: list[int], op: str) -> tuple[str, int]:
    if op == "sum":
        return " + ".join(map(str, values)) + f" = {sum(values)}", sum(values)
    result = values[0] - sum(values[1:])
    return " - ".join(map(str, values)) + f" = {result}", result


def _fact(name: str, key: str, value) -> dict:
    return {"name": name, "key": key, "value": str(value)}


def count_sum(rng: random.Random, cfg: SuiteConfig) -> Scene:
    """MathVista-like: count shapes of some colours, then add or subtract the counts."""
    extra = rng.randint(0, min(len(COLOURS), cfg.max_objects) - cfg.terms)
    colours = rng.sample(list(COLOURS), cfg.terms + extra)
    asked = colours[:cfg.terms]
    total = rng.randint(max(3, len(colours)), cfg.max_objects)
    counts = {c: 1 for c in colours}
    for _ in range(total - len(colours)):
        counts[rng.choice(colours)] += 1
    op = "sum" if cfg.terms == 3 or rng.random() < 0.5 else "difference"
    if op == "difference":
        asked.sort(key=lambda c: -counts[c])
    image, objects = _shape_scene(rng, counts)
    values = [counts[c] for c in asked]
    expr, result = _arith(values, op)
    names = " and ".join(asked)
    question = (f"How many {names} shapes are there in total?" if op == "sum" else
                f"How many more {asked[0]} shapes than {asked[1]} shapes are there?")
    steps = [_fact(f"Count {c}", f"{c.capitalize()} shapes", counts[c]) for c in asked]
    steps.append(_fact("Add" if op == "sum" else "Subtract",
                       "Total" if op == "sum" else "Difference", expr))
    return Scene(image, question, str(result), steps, {"objects": objects, "counts": counts})


def bar_chart(rng: random.Random, cfg: SuiteConfig) -> Scene:
    """ChartQA-like: read bar heights off a gridded chart, then combine them."""
    colours = rng.sample(list(COLOURS), rng.randint(3, 4))
    heights = {c: rng.randint(1, 9) for c in colours}
    image, draw = _canvas()
    unit, base, width = 9, IMAGE_SIZE - 6, 14
    for level in range(1, 10):
        y = base - level * unit
        draw.line([(4, y), (IMAGE_SIZE - 2, y)], fill=(215, 215, 215))
    draw.line([(4, base), (IMAGE_SIZE - 2, base)], fill=(0, 0, 0))
    gap = (IMAGE_SIZE - 8 - len(colours) * width) // (len(colours) + 1)
    for i, c in enumerate(colours):
        x = 6 + gap + i * (width + gap)
        draw.rectangle((x, base - heights[c] * unit, x + width, base - 1), fill=COLOURS[c])
    if rng.random() < 0.5:
        asked = rng.sample(colours, cfg.terms)
        expr, result = _arith([heights[c] for c in asked], "sum")
        question = f"What is the sum of the {' and '.join(asked)} bars?"
        steps = [_fact(f"Read {c} bar", f"{c.capitalize()} bar", heights[c]) for c in asked]
        steps.append(_fact("Add", "Sum", expr))
    else:
        ranked = sorted(colours, key=lambda c: heights[c])
        hi, lo = ranked[-1], ranked[0]
        if heights[hi] == heights[ranked[-2]] or heights[lo] == heights[ranked[1]]:
            return bar_chart(rng, cfg)
        expr, result = _arith([heights[hi], heights[lo]], "difference")
        question = "What is the difference between the tallest and the shortest bar?"
        steps = [_fact("Find tallest bar", "Tallest bar", f"{hi} {heights[hi]}"),
                 _fact("Find shortest bar", "Shortest bar", f"{lo} {heights[lo]}"),
                 _fact("Subtract", "Difference", expr)]
    return Scene(image, question, str(result), steps, {"bars": heights, "order": colours})


def _options(rng: random.Random, right: str, pool: list[str]) -> tuple[list[str], str]:
    choices = [right] + rng.sample([p for p in pool if p != right], min(3, len(pool) - 1))
    rng.shuffle(choices)
    return choices, LETTERS[choices.index(right)]


def attribute_mc(rng: random.Random, cfg: SuiteConfig) -> Scene:
    """MMStar/AI2D-like multiple choice: find the largest/smallest shape, read its colour."""
    colours, shapes = rng.sample(list(COLOURS), 3), rng.sample(SHAPES, 3)
    sides = rng.sample([12, 18, 24, 30], 3)
    image, draw = _canvas()
    objects = []
    for colour, kind, side, slot in zip(colours, shapes, sides, rng.sample(range(9), 3)):
        x, y = (slot % 3) * 32 + rng.randint(0, 31 - side), (slot // 3) * 32 + rng.randint(0, 31 - side)
        _draw_shape(draw, kind, (x, y, x + side, y + side), colour)
        objects.append({"colour": colour, "shape": kind, "size": side, "box": [x, y, x + side, y + side]})
    which = rng.choice(["largest", "smallest"])
    pick = (max if which == "largest" else min)(objects, key=lambda o: o["size"])
    options, letter = _options(rng, pick["colour"], list(COLOURS))
    question = f"What colour is the {which} shape?"
    steps = [_fact(f"Find {which} shape", f"{which.capitalize()} shape", pick["shape"]),
             _fact("Read its colour", f"Colour of the {pick['shape']}", pick["colour"]),
             _fact("Match option", "Matching option", letter)]
    return Scene(image, question, letter, steps, {"objects": objects}, options, kind="choice")


def measure(rng: random.Random, cfg: SuiteConfig) -> Scene:
    """MathVista-like measuring: lengths of coloured segments on a unit grid, then arithmetic."""
    colours = rng.sample(list(COLOURS), cfg.terms)
    unit = 10
    image, draw = _canvas()
    for k in range(1, 9):
        draw.line([(4 + k * unit, 2), (4 + k * unit, IMAGE_SIZE - 2)], fill=(220, 220, 220))
    lengths = {c: rng.randint(1, 8) for c in colours}
    op = "sum" if cfg.terms == 3 or rng.random() < 0.5 else "difference"
    if op == "difference":
        while lengths[colours[0]] == lengths[colours[1]]:
            lengths[colours[1]] = rng.randint(1, 8)
        colours.sort(key=lambda c: -lengths[c])
    rows = rng.sample(range(len(colours) + 1), len(colours))
    for c, row in zip(colours, rows):
        y = 14 + row * 22
        draw.rectangle((4, y, 4 + lengths[c] * unit, y + 5), fill=COLOURS[c])
    expr, result = _arith([lengths[c] for c in colours], op)
    question = (f"What is the total length of the {' and '.join(colours)} lines in grid units?"
                if op == "sum" else
                f"How much longer is the {colours[0]} line than the {colours[1]} line in grid units?")
    steps = [_fact(f"Measure {c} line", f"{c.capitalize()} line", lengths[c]) for c in colours]
    steps.append(_fact("Add" if op == "sum" else "Subtract",
                       "Total" if op == "sum" else "Difference", expr))
    return Scene(image, question, str(result), steps, {"lengths": lengths})


def compare_mc(rng: random.Random, cfg: SuiteConfig) -> Scene:
    """M3CoT-like multi-hop comparison: count each group, compare, pick the option."""
    colours = rng.sample(list(COLOURS), cfg.terms + 1)
    while True:
        counts = {c: rng.randint(1, max(2, cfg.max_objects // len(colours) + 1)) for c in colours}
        ranked = sorted(counts.values())
        if ranked[-1] != ranked[-2] and sum(ranked) <= 16:
            break
    most = max(colours, key=lambda c: counts[c])
    image, objects = _shape_scene(rng, counts)
    options = list(colours)
    letter = LETTERS[options.index(most)]
    question = "Which colour has the most shapes?"
    steps = [_fact(f"Count {c}", f"{c.capitalize()} shapes", counts[c]) for c in colours]
    steps.append(_fact("Compare counts", "Most shapes", f"{most}, option {letter}"))
    return Scene(image, question, letter, steps, {"objects": objects, "counts": counts},
                 options, kind="choice")


FAMILIES: dict[str, Callable[[random.Random, SuiteConfig], Scene]] = {
    "count_sum": count_sum,
    "bar_chart": bar_chart,
    "attribute_mc": attribute_mc,
    "measure": measure,
    "compare_mc": compare_mc,
}


def record_seed(base: int, split: str, family: str, index: int) -> int:
    """Disjoint seed ranges per split and family, so no two splits ever share a seed."""
    return base * 10_000_000 + SPLITS.index(split) * 1_000_000 \
        + sorted(FAMILIES).index(family) * 100_000 + index


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def generate(cfg: SuiteConfig, split: str) -> Iterator[tuple[dict, bytes]]:
    """Records of one split (families interleaved) with their PNG bytes, deterministic by seed."""
    n = getattr(cfg, split)
    per_family = [n // len(cfg.families) + (i < n % len(cfg.families))
                  for i in range(len(cfg.families))]
    for index in range(max(per_family, default=0)):
        for family, count in zip(cfg.families, per_family):
            if index >= count:
                continue
            seed = record_seed(cfg.seed, split, family, index)
            scene = FAMILIES[family](random.Random(seed), cfg)
            rid = f"{family}-{split}-{index:05d}"
            record = {
                "id": rid, "image": f"images/{rid}.png", "question": scene.question,
                "options": scene.options, "answer": scene.answer, "source": "synthetic",
                "meta": {"family": family, "split": split, "seed": seed, "kind": scene.kind,
                         "steps": scene.steps, "scene": scene.facts,
                         "difficulty": {"max_objects": cfg.max_objects, "terms": cfg.terms}},
            }
            yield record, _png(scene.image)


def fingerprint(record: dict, png: bytes) -> str:
    """Identity of an image+question pair, used to keep splits disjoint."""
    return hashlib.sha256(png + record["question"].encode() + repr(record["options"]).encode()
                          ).hexdigest()


def make_tasks(cfg: SuiteConfig, out_dir: str | Path, splits: tuple[str, ...] = SPLITS) -> dict:
    """Write `{split}.jsonl` + `images/*.png` under out_dir; resumable, splits kept disjoint.

    A val/test candidate whose image+question already appears in an earlier split is skipped,
    so the held-out splits can be a little smaller than asked; the counts are returned.
    """
    from .records import JsonlWriter, done_ids

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    counts = {}
    for split in splits:
        path = out_dir / f"{split}.jsonl"
        done = done_ids(path)
        written = skipped = 0
        with JsonlWriter(path) as writer:
            for record, png in generate(cfg, split):
                key = fingerprint(record, png)
                if key in seen:
                    skipped += 1
                    continue
                seen.add(key)
                written += 1
                if record["id"] in done:
                    continue
                (out_dir / record["image"]).write_bytes(png)
                writer.write(record)
        counts[split] = {"records": written, "skipped_duplicates": skipped}
    return counts
