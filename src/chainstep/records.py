"""JSONL records: one object a line, appended, keyed by `id`, safe to resume after a crash.

One loader serves every stage. A bad line raises `RecordError` naming file, line and id; a
half-written last line (the process was killed mid-write) is dropped with a warning instead,
since appending resumes from it.

An `image` path is stored relative to the file that holds it and resolved on load, so a run
directory keeps working when it is moved or read from another working directory. In memory
every path is usable as it stands (absolute, or relative to the working directory).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from PIL import Image

from .errors import ChainstepError, RecordError

TASK_FIELDS = ("id", "image", "question", "options", "answer", "source", "meta")


def read_jsonl(path: str | Path, required: tuple[str, ...] = ("id",)) -> list[dict]:
    return list(iter_jsonl(path, required))


def iter_jsonl(path: str | Path, required: tuple[str, ...] = ("id",)) -> Iterator[dict]:
    path = Path(path)
    if not path.exists():
        raise ChainstepError(f"{path} does not exist")
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # an unterminated last line: a write cut short by a kill
                warnings.warn(f"{path}:{number}: dropping a truncated last line", stacklevel=2)
                return
            raise RecordError(path, number, f"invalid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise RecordError(path, number, "expected a JSON object")
        missing = [k for k in required if k not in record]
        if missing:
            raise RecordError(path, number, f"missing field(s) {missing}", record.get("id"))
        if _is_path(record.get("image")):
            record["image"] = _loaded_image(record["image"], path.parent)
        yield record


def _is_path(image) -> bool:
    return isinstance(image, str) and bool(image) and "://" not in image and not image.startswith("data:")


def _loaded_image(image: str, folder: Path) -> str:
    if Path(image).is_absolute():
        return image
    resolved = folder / image
    if resolved.exists() or not Path(image).exists():
        return str(resolved)
    return image  # written before paths were stored relative to their file


def _stored_image(image: str, folder: Path) -> str:
    return os.path.relpath(os.path.abspath(image), os.path.abspath(folder))


def settings_path(path: str | Path) -> Path:
    """Where the settings a records file was made under are kept: `NAME.settings.json` beside it."""
    path = Path(path)
    return path.with_name(path.stem + ".settings.json")


def done_ids(path: str | Path) -> set[str]:
    """Ids already written, so a resumed stage skips them."""
    path = Path(path)
    return {r["id"] for r in iter_jsonl(path)} if path.exists() else set()


class JsonlWriter:
    """Appends records and flushes each line to disk, so a kill loses at most the line in flight."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        self._file = self.path.open("a", encoding="utf-8")

    def _repair_tail(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):
            self.path.write_bytes(data[:data.rfind(b"\n") + 1])

    def write(self, record: dict) -> None:
        if _is_path(record.get("image")):
            record = {**record, "image": _stored_image(record["image"], self.path.parent)}
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def write_all(self, records: Iterable[dict]) -> None:
        for record in records:
            self.write(record)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_tasks(path: str | Path) -> list[dict]:
    """Task records (docs/design.md §2)."""
    path = Path(path)
    records = read_jsonl(path, required=TASK_FIELDS)
    for number, record in enumerate(records, start=1):
        if record["options"] is not None and not isinstance(record["options"], list):
            raise RecordError(path, number, "options must be a list or null", record["id"])
    return records


def load_image(record: dict) -> Image.Image:
    """The record's image: a path, or an image already in memory (a request to the server)."""
    if isinstance(record["image"], Image.Image):
        return record["image"].convert("RGB")
    try:
        with Image.open(record["image"]) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise ChainstepError(f"record {record['id']}: image {record['image']} not found") from None
    except OSError as err:
        raise ChainstepError(f"record {record['id']}: cannot read image {record['image']}: {err}"
                             ) from None


def prompt_text(record: dict) -> str:
    """The question as the policy sees it: options appended as (A) ... (B) ..., then the record's
    fixed instruction if it has one (benchmarks: what form the answer takes)."""
    text = record["question"]
    if record.get("options"):
        text += " Options: " + " ".join(f"({chr(65 + i)}) {o}"
                                        for i, o in enumerate(record["options"]))
    instruction = (record.get("meta") or {}).get("instruction")
    return f"{text}\n{instruction}" if instruction else text


def by_sample(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """Label rows grouped by the sampled chain they label, then by label source (mc, judge, ...)."""
    out: dict[str, dict[str, dict]] = {}
    for row in rows:
        out.setdefault(row["sample_id"], {})[row["source"]] = row
    return out


def replace_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """Write `records` as the whole of `path`, atomically: a kill leaves the old file or the new
    one, never a mix (files rewritten whole, as pairs and rejects are)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with JsonlWriter(tmp) as writer:
        writer.write_all(records)
    tmp.replace(path)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `path` whole or not at all: a temporary file beside it, flushed to disk, then renamed
    over it. A kill mid-write leaves the old file (or none), never half a file a resume trips on."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, data) -> Path:
    """`data` as indented JSON, atomically (markers, summaries, settings, metrics)."""
    return write_text_atomic(path, json.dumps(data, indent=2))


def family_of(record: dict) -> str:
    """A record's family: the synthetic suite's task family, a benchmark's category or name."""
    return record.get("family") or record.get("meta", {}).get("family") or record.get("source") or "all"


def mean_of(values: Iterable) -> float | None:
    """The mean of the values that are not None; None when there are none (not a 0.0 that reads
    as a result)."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
