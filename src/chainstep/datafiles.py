"""Other people's data files: parquet, JSON, JSONL and VLMEvalKit TSV rows, with their images.

Benchmarks and teacher inputs arrive in the layouts their publishers chose; this module turns a
file into plain dict rows and finds or writes out each row's image, so the loaders above it only
map field names.
"""

from __future__ import annotations

import ast
import base64
import csv
import io
import json
import re
import string
import sys
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from .errors import ChainstepError
from .records import iter_jsonl

LETTERS = string.ascii_uppercase


def read_rows(file: Path) -> Iterator[dict]:
    suffix = file.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(file).to_pylist()
    elif suffix == ".jsonl":
        yield from iter_jsonl(file, required=())
    elif suffix == ".json":
        data = json.loads(file.read_text(encoding="utf-8"))
        if isinstance(data, dict):  # MathVista: {pid: problem}
            yield from ({"id": str(k), **v} for k, v in data.items())
        else:
            split = {"test_human": "human_test", "test_augmented": "augmented_test"}.get(file.stem)
            for i, row in enumerate(data):  # ChartQA's test_human.json rows have no id or split
                yield {"type": split, **row, "row": i} if split else row
    elif suffix == ".tsv":
        csv.field_size_limit(sys.maxsize)
        with file.open(encoding="utf-8", newline="") as f:
            encoded: dict[str, str] = {}
            for row in csv.DictReader(f, delimiter="\t"):
                options = [row.pop(c) for c in LETTERS if c in row]
                yield {**row, **_tsv_images(row, encoded),
                       "options": [o for o in options if o not in ("", "nan")]}
    else:
        raise ChainstepError(f"{file}: unsupported file type {suffix!r} "
                             "(parquet, json, jsonl or tsv)")


def _tsv_images(row: dict, encoded: dict[str, str]) -> dict:
    """VLMEvalKit TSV images: base64, a list of them, or the index of a row that holds them."""
    value = row.pop("image", None) or ""
    value = encoded.get(value, value)
    encoded[row.get("index", "")] = value
    images = ast.literal_eval(value) if value.startswith("[") else [value] if value else []
    return {f"image_{i}": {"bytes": base64.b64decode(x)} for i, x in enumerate(images, start=1)}


def row_image(row: dict, rid: str, base: Path, image_dir: Path) -> str | None:
    """A path to the question's image: a file named by the row, or the row's bytes written out."""
    stored = [row[k] for k in ("decoded_image", "image", *(f"image_{i}" for i in range(1, 8)))
              if isinstance(row.get(k), dict) and row[k].get("bytes")]
    if stored:
        target = image_dir / (re.sub(r"[^\w.-]", "_", rid) + ".png")
        if not target.exists():
            image_dir.mkdir(parents=True, exist_ok=True)
            side_by_side([Image.open(io.BytesIO(s["bytes"])) for s in stored]).save(target)
        return str(target)
    for key in ("image", "original_image_path", "imgname", "image_id"):
        value = row.get(key)
        if isinstance(value, (str, int)) and str(value):
            for folder in (base, base / "images", base / "png", base.parent / "images", image_dir):
                for name in (str(value), f"{value}.png", f"{value}.jpg"):
                    if (folder / name).is_file():
                        return str(folder / name)
    return None


def side_by_side(images: list[Image.Image]) -> Image.Image:
    images = [im.convert("RGB") for im in images]
    if len(images) == 1:
        return images[0]
    canvas = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)), "white")
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width
    return canvas


TASK_COLUMNS = ("id", "image", "question", "answer", "options")


def load_inputs(path: str | Path, columns: dict[str, str] | None = None,
                image_dir: str | Path | None = None) -> list[dict]:
    """Task records (docs/design.md §2) for the teacher from data made elsewhere: our own task JSONL, a
    LLaVA / ShareGPT conversation JSON (the first human turn is the question, the first model turn
    the answer), or a Hugging Face datasets file (parquet, JSON, JSONL) whose image, question and
    answer columns `columns` renames, e.g. {"question": "query", "answer": "label"}."""
    from .records import TASK_FIELDS, load_tasks

    path = Path(path)
    if not path.is_file():
        raise ChainstepError(f"{path} is not a file (task JSONL, LLaVA/ShareGPT JSON, parquet or JSON)")
    if path.suffix == ".jsonl" and all(k in (next(read_rows(path), None) or {}) for k in TASK_FIELDS):
        return load_tasks(path)  # our own layout: decided from its first line
    rows = list(read_rows(path))
    names = {**{c: c for c in TASK_COLUMNS}, **(columns or {})}
    image_dir = Path(image_dir) if image_dir else path.parent / "images"
    records = []
    for number, row in enumerate(rows, start=1):
        where = f"{path}:{number}" if path.suffix == ".jsonl" else f"{path} row {number}"
        row = _conversation_row(row) if ("conversations" in row or "messages" in row) else \
            {k: row.get(col) for k, col in names.items()}
        rid = str(row["id"]) if row.get("id") not in (None, "") else f"{path.stem}-{number - 1}"
        missing = [k for k in ("question", "answer") if row.get(k) in (None, "")]
        if missing:
            raise ChainstepError(f"{where} (id {rid}): no {' or '.join(missing)}; columns read: "
                                 + ", ".join(f"{k}={names[k]}" for k in missing))
        image = row_image(row, rid, path.parent, image_dir)
        if image is None:
            raise ChainstepError(f"{where} (id {rid}): image {str(row.get('image'))[:80]!r} not found "
                                 f"(column {names['image']!r}, looked next to {path} and in images/)")
        options = row.get("options")
        records.append({"id": rid, "image": image, "question": str(row["question"]),
                        "options": [str(o) for o in options] if options else None,
                        "answer": str(row["answer"]), "source": "input", "meta": {}})
    return records


def _conversation_row(row: dict) -> dict:
    """LLaVA `conversations: [{from, value}]` or ShareGPT `messages: [{role, content}]`."""
    turns = row.get("conversations") or row.get("messages") or []
    said = [(t.get("from") or t.get("role"), t.get("value") or t.get("content") or "") for t in turns]
    question = next((text for who, text in said if who in ("human", "user")), None)
    answer = next((text for who, text in said if who in ("gpt", "assistant")), None)
    image = row.get("image") or row.get("images")
    return {"id": row.get("id"), "image": image[0] if isinstance(image, list) and image else image,
            "question": question and question.replace("<image>", "").strip(), "answer": answer,
            "options": None}


def export_conversations(rows: list[dict], layout: str = "llava") -> list[dict]:
    """SFT rows (sft.jsonl) as the conversation layouts other fine-tuning tools read: `llava`
    (`conversations: [{from: human|gpt, value}]`, `<image>` in the first turn) or `sharegpt`
    (`messages: [{role, content}]` plus `images: [path]`, as LLaMA-Factory reads it)."""
    from .records import prompt_text

    if layout not in ("llava", "sharegpt"):
        raise ChainstepError(f"unknown layout {layout!r}: choose llava or sharegpt")
    out = []
    for row in rows:
        question = "<image>\n" + prompt_text(row)
        if layout == "llava":
            out.append({"id": row["id"], "image": row["image"], "conversations": [
                {"from": "human", "value": question}, {"from": "gpt", "value": row["response"]}]})
        else:
            out.append({"id": row["id"], "images": [row["image"]], "messages": [
                {"role": "user", "content": question}, {"role": "assistant", "content": row["response"]}]})
    return out
