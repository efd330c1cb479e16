"""Generation across machines: shard I of N takes the records whose id hashes to I, writes its own
files, and `merge` joins the shards into the file the next stage reads.

The hash is of the record id alone, so adding records never moves the others to another
shard, and every shard is a plain resumable run of the same command. A shard that finishes
leaves `NAME.shard-I-of-N.done.json` listing its records in the input's order; `merge` refuses
a set with a shard missing, unfinished, made under other settings or holding an id twice, and
names the shard. Any launcher works: a SLURM array, a Kubernetes indexed job, torchrun ranks.

    chainstep sample MODEL tasks/train.jsonl --out samples.jsonl --shard 0/4     # ... 3/4
    chainstep merge samples.jsonl --shards 4
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import ChainstepError
from .records import JsonlWriter, iter_jsonl, settings_path, write_json

_SPEC = re.compile(r"^(\d+)/(\d+)$")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, spec: str | None) -> Shard | None:
        if spec is None:
            return None
        match = _SPEC.match(spec.strip())
        if not match or not int(match[1]) < int(match[2]):
            raise ChainstepError(f"--shard {spec!r}: write I/N with 0 <= I < N, e.g. --shard 0/4")
        return cls(int(match[1]), int(match[2]))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, record_id: str) -> bool:
        digest = hashlib.sha256(record_id.encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index

    def select(self, records: list[dict]) -> list[dict]:
        return [r for r in records if self.holds(r["id"])]

    def path(self, path: str | Path) -> Path:
        """`samples.jsonl` -> `samples.shard-0-of-4.jsonl`."""
        path = Path(path)
        return path.with_name(f"{path.stem}.shard-{self.index}-of-{self.count}{path.suffix}")


def _done_path(path: Path) -> Path:
    return path.with_name(path.stem + ".done.json")


def mark_done(path: str | Path, shard: Shard, records: list[dict], all_records: list[dict]) -> Path:
    """Record that `shard` finished writing `path` for `records` (positions in `all_records`)."""
    position = {r["id"]: i for i, r in enumerate(all_records)}
    done = _done_path(Path(path))
    done.write_text(json.dumps({"shard": str(shard), "records": [[position[r["id"]], r["id"]]
                                                                   for r in records]}))
    return done


@contextmanager
def sharded(spec: str | None, records: list[dict], path: str | Path) -> Iterator[tuple[list[dict], Path]]:
    """The records and output file of shard `spec` ("I/N"; all of them and `path` itself without
    one); the shard is marked done when the block finishes without an error."""
    shard = Shard.parse(spec)
    if shard is None:
        yield records, Path(path)
        return
    mine, part = shard.select(records), shard.path(path)
    yield mine, part
    mark_done(part, shard, mine, records)


def merge(path: str | Path, count: int) -> dict:
    """Join `path`'s `count` shards into `path`, rows in the order of the input records (so the
    result is the file one unsharded run writes); the shards' settings files must agree."""
    path = Path(path)
    shards = [Shard(i, count) for i in range(count)]
    order: dict[str, int] = {}
    rows_by_question: dict[str, list[dict]] = {}
    settings = None
    for shard in shards:
        part = shard.path(path)
        done = _done_path(part)
        if not done.exists():
            raise ChainstepError(f"shard {shard} ({part.name}) is incomplete: it has no {done.name}; "
                                 "run it again (it resumes) before merging")
        expected = {rid: at for at, rid in json.loads(done.read_text())["records"]}
        for rid, at in expected.items():
            if rid in order:
                raise ChainstepError(f"record {rid} is in shard {shard} and an earlier one: the shards "
                                     "were made from different inputs")
            order[rid] = at
        settings = _same_settings(part, shard, settings)
        for row in iter_jsonl(part) if part.exists() else ():
            question = row.get("question_id", row["id"])
            if question not in expected:
                raise ChainstepError(f"{part.name}: row {row['id']} belongs to no record of shard {shard}")
            rows_by_question.setdefault(question, []).append(row)
    seen: set[str] = set()
    for rows in rows_by_question.values():
        for row in rows:
            if row["id"] in seen:
                raise ChainstepError(f"row {row['id']} appears twice in the shards of {path.name}")
            seen.add(row["id"])
    if path.exists():
        raise ChainstepError(f"{path} exists; move it away to merge into it")
    rows = [row for question in sorted(rows_by_question, key=order.__getitem__)
            for row in rows_by_question[question]]
    with JsonlWriter(path) as writer:
        writer.write_all(rows)
    if settings is not None:
        write_json(settings_path(path), settings)
    return {"file": str(path), "shards": count, "records": len(order), "rows": len(rows)}


def _same_settings(part: Path, shard: Shard, settings: dict | None) -> dict | None:
    beside = settings_path(part)
    if not beside.exists():
        return settings
    mine = json.loads(beside.read_text())
    if settings is not None and mine != settings:
        raise ChainstepError(f"shard {shard} ({part.name}) was made with other settings than the "
                             "shards before it; results made under different settings are never mixed")
    return mine

