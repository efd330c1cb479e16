"""The paper's six benchmarks: loaders for the layouts their publishers ship, and each one's own scoring rule.

    records = load("mathvista", "data/MathVista")          # HF parquet, original JSON or JSONL
    score("mathvista", response_text, records[0])           # -> 1.0 or 0.0

A response is scored in two stages. First the text a benchmark rule should see: the answer span
of a step-format response (a response that starts a chain but does not parse is wrong, docs/design.md
§1), or the whole text of a free-form response from a baseline model. Then the benchmark's own rule,
re-implemented from its official scorer and checked against that scorer's verdicts on real
responses (`tests/test_benchmarks.py`):

- MMStar: the MMStar repo's `MMStar_eval` (the first character, `(X`, `option X`, `the answer is X`).
- AI2D: lmms-eval (`^\\s*X.` filter, then exact match ignoring case and punctuation).
- MMMU: MMMU's `parse_multi_choice_response` / `parse_open_response` and `eval_*`.
- M3CoT: the M3CoT repo's `judge_answer`.
- MathVista: answer extraction, then the official `normalize_extracted_answer` + `safe_equal`.
- ChartQA: pix2struct's relaxed accuracy (5% relative tolerance for numbers, exact otherwise),
  best over the references, `relaxed_correctness(target, prediction)`.

Where an official rule would guess (MMMU picks a random option when it finds none) the response
counts as unparseable and wrong. MathVista's official pipeline extracts answers with GPT; here
rules do it by default and `LLMExtractor` (any OpenAI-compatible endpoint) is the option, also
used as VLMEvalKit's fallback for multiple-choice responses the rules cannot read.
"""

from __future__ import annotations

import ast
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .datafiles import LETTERS, read_rows, row_image
from .errors import ChainstepError
from .steps import ANSWER_START, REASONING_START, FormatError, extract_answer, parse

TEMPLATES = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class Benchmark:
    """What a user needs to reproduce a number: the files, the budget, the categories reported."""

    name: str
    title: str
    split: str
    layouts: str  # what `load` accepts, for error messages and docs
    patterns: tuple[str, ...]  # files searched for when `load` is given a folder
    category: str  # the field behind the per-category breakdown
    max_tokens: int
    judge: Callable[[str, dict], tuple[str | None, bool]]


# ---------------------------------------------------------------- field access


def field(record: dict, key: str, default=None):
    """A benchmark field from a plain dict or from a task record's `meta`."""
    if key in record and record[key] is not None:
        return record[key]
    return (record.get("meta") or {}).get(key, default)


def options_of(record: dict) -> list[str]:
    options = record.get("options") or record.get("choices") or field(record, "choices") or []
    return [str(o) for o in options]


def references(record: dict) -> list[str]:
    answer = record["answer"]
    return [str(a) for a in answer] if isinstance(answer, list) else [str(answer)]


def _letters(record: dict) -> str:
    """The option letters in lower case (A-D where the record does not list its options)."""
    return LETTERS[:len(options_of(record)) or 4].lower()


def _letter_answer(record: dict) -> str:
    answer = record["answer"]
    return LETTERS[answer] if isinstance(answer, int) else str(answer)


# ---------------------------------------------------------------- MMStar


def judge_mmstar(text: str, record: dict) -> tuple[str | None, bool]:
    answer = _letter_answer(record).lower().strip().replace("\n", " ")
    predict = text.lower().strip().replace("\n", " ")
    for prefix in ("the answer is ", "option ", "("):
        if predict.startswith(prefix):
            letter = predict[len(prefix):len(prefix) + 1]
            break
    else:
        letter = predict[:1]
    predicted = letter.upper() if letter and letter in _letters(record) else None
    return predicted, bool(letter) and letter == answer


# ---------------------------------------------------------------- AI2D (lmms-eval)

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def judge_ai2d(text: str, record: dict) -> tuple[str | None, bool]:
    match = re.match(r"^\s*([A-Z])\.", text)
    filtered = match.group(1) if match else text
    norm = filtered.lower().translate(_PUNCTUATION)
    predicted = norm.upper() if len(norm) == 1 and norm in _letters(record) else None
    return predicted, norm == _letter_answer(record).lower().translate(_PUNCTUATION)


# ---------------------------------------------------------------- MMMU


def mmmu_choice(response: str, options: list[str]) -> str | None:
    """MMMU's multiple-choice parser; None where the official code would pick at random."""
    choices = LETTERS[:len(options)]
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = f" {response} "
    candidates = [c for c in choices if f"({c})" in response]
    bracketed, by_letter = bool(candidates), True
    if not candidates:
        candidates = [c for c in choices if f" {c} " in response]
    if not candidates and len(response.split()) > 5:
        candidates = [c for c, o in zip(choices, options) if o.lower() in response.lower()]
        by_letter = False
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    if not by_letter:
        positions = [response.lower().rfind(options[LETTERS.index(c)].lower()) for c in candidates]
    else:
        positions = [response.rfind(f"({c})" if bracketed else f" {c} ") for c in candidates]
    return candidates[positions.index(max(positions))]


def _mmmu_number(text: str) -> float | None:
    try:
        return round(float(text.replace(",", "")), 2)
    except ValueError:
        return None


def _mmmu_normalize(text: str) -> list:
    text = text.strip()
    number = _mmmu_number(text)
    if number is not None:
        return [number]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def _numbers_in(text: str) -> list[str]:
    return (re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", text)
            + re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", text)
            + re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", text))


def mmmu_open(response: str) -> list:
    """MMMU's open-answer parser: the tails after key phrases, and the numbers in them."""
    sentences = re.split(r"\.\s(?=[A-Z])|\n", response.strip().strip(".").lower())
    indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
    keys = []
    for i, sentence in enumerate(sentences):
        if i == len(sentences) - 1:
            indicators.append("=")
        tails = [sentence.split(ind)[-1].strip() for ind in indicators if ind in sentence]
        shortest = min(tails, key=len) if tails else None
        if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    keys = keys or [response.strip().strip(".").lower()]
    predictions = keys + [n for k in keys for n in _numbers_in(k)]
    return list(dict.fromkeys(x for p in predictions for x in _mmmu_normalize(p)))


def mmmu_open_correct(predictions: list, record: dict) -> bool:
    answers = [x for a in references(record) for x in _mmmu_normalize(a)]
    for pred in predictions:
        if isinstance(pred, str):
            if any(isinstance(a, str) and a in pred for a in answers):
                return True
        elif pred in answers:
            return True
    return False


def judge_mmmu(text: str, record: dict) -> tuple[str | None, bool]:
    if field(record, "question_type", "multiple-choice") == "multiple-choice":
        letter = mmmu_choice(text, options_of(record))
        return letter, letter is not None and letter in references(record)
    predictions = mmmu_open(text)
    return (str(predictions[0]) if predictions else None), mmmu_open_correct(predictions, record)


# ---------------------------------------------------------------- M3CoT


def judge_m3cot(text: str, record: dict) -> tuple[str | None, bool]:
    choices = options_of(record)
    letters = LETTERS[:len(choices)]
    if "[Answer]" in text:
        text = text.split("[Answer]")[-1].split("[Rationale]")[0].split("[Context]")[0]
    found = [m.upper() for m in re.findall(r"\(([A-Za-z])\)", text)]
    if not found:
        found = [c for c, o in zip(letters, choices) if o.lower() in text.lower()]
    if not found:
        words = re.sub(r"[\n.,!?]", " ", text).split(" ")
        found = [c for c in letters if c in words] or [c for c in letters if c.lower() in words]
    predicted = found[-1] if found else None
    return predicted, predicted == _letter_answer(record)


# ---------------------------------------------------------------- MathVista


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def _precision(record: dict) -> int | None:
    value = field(record, "precision")
    return int(value) if isinstance(value, (int, float)) and value == value else None


def mathvista_normalize(extraction: str, record: dict) -> str | None:
    """The official `normalize_extracted_answer`: the prediction in the answer's own form."""
    choices = options_of(record)
    if field(record, "question_type") == "multi_choice":
        extraction = extraction.strip()
        letter = re.findall(r"\(([a-zA-Z])\)", extraction)
        if letter:
            extraction = letter[0].upper()
        letters = list(LETTERS[:len(choices)])
        if extraction in letters:
            return choices[letters.index(extraction)]
        distances = [edit_distance(extraction, c) for c in choices]
        return choices[distances.index(min(distances))]
    answer_type = field(record, "answer_type")
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            return str(round(float(extraction), _precision(record)))
    except (ValueError, TypeError):
        return None
    return str(extraction)


_ANSWER_IS = re.compile(r"(?:answer|result)\s*(?:is|:)\s*(.+)", re.IGNORECASE | re.DOTALL)


def mathvista_quick(response: str, record: dict) -> str | None:
    """The rules MathVista's pipeline applies before it asks GPT."""
    if field(record, "question_type") == "multi_choice" and response in options_of(record):
        return response
    answer_type = field(record, "answer_type")
    if answer_type in ("integer", "float"):
        try:
            return str(int(response) if answer_type == "integer" else float(response))
        except ValueError:
            pass
    quoted = re.search(r'The answer is "(.*)"\.', response)
    return quoted.group(1) if quoted else None


def mathvista_extract(response: str, record: dict) -> str | None:
    """Rule-based extraction: the official quick rules, then the answer the text commits to."""
    response = response.strip()
    if not response:
        return None
    quick = mathvista_quick(response, record)
    if quick is not None:
        return quick
    committed = _ANSWER_IS.findall(response)
    tail = committed[-1].strip() if committed else response
    answer_type, choices = field(record, "answer_type"), options_of(record)
    if field(record, "question_type") == "multi_choice":
        letters = [x.upper() for x in re.findall(r"\(([A-Za-z])\)", tail)]
        bare = tail.strip(" .:()").upper()
        letters = letters or ([bare] if len(bare) == 1 else [])
        valid = [x for x in letters if x in LETTERS[:len(choices)]]
        named = [c for c in choices if c.lower() in tail.lower()]
        if valid or named:
            return valid[-1] if valid else max(named, key=len)
        # a bare value ("45" for the option "45°"): the official normalisation maps it to the
        # nearest option by edit distance
        numbers = re.findall(r"-?\d+(?:\.\d+)?", tail.replace(",", ""))
        value = tail.rstrip(".").strip() if committed else (numbers[-1] if numbers else None)
        return value or None
    if answer_type == "list":
        spans = re.findall(r"\[[^\[\]]*\]", tail)
        return spans[-1] if spans else None
    if answer_type in ("integer", "float"):
        numbers = re.findall(r"-?\d+(?:\.\d+)?", tail.replace(",", ""))
        return (numbers[0] if committed else numbers[-1]) if numbers else None
    return tail.rstrip(".").strip() or None


def mathvista_verdict(extraction: str, record: dict) -> tuple[str | None, bool]:
    """The official scoring of an extracted answer: normalise, then `safe_equal`."""
    prediction = mathvista_normalize(extraction, record)
    return prediction, prediction is not None and prediction == str(record["answer"])


def judge_mathvista(text: str, record: dict) -> tuple[str | None, bool]:
    extraction = mathvista_extract(text, record)
    return (None, False) if extraction is None else mathvista_verdict(extraction, record)


# ---------------------------------------------------------------- ChartQA


def _chartqa_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correctness(target: str, prediction: str, max_relative_change: float = 0.05) -> bool:
    prediction_float, target_float = _chartqa_float(prediction), _chartqa_float(target)
    if prediction_float is not None and target_float:
        return abs(prediction_float - target_float) / abs(target_float) <= max_relative_change
    return prediction.lower() == target.lower()


def judge_chartqa(text: str, record: dict) -> tuple[str | None, bool]:
    return (text or None), any(relaxed_correctness(t, text) for t in references(record))


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("mathvista", "MathVista", "testmini",
              "HF AI4Math/MathVista (testmini-*.parquet), the repo's data/testmini.json + images/, "
              "or JSONL records", ("**/testmini-*.parquet", "**/testmini.json"), "task", 1024,
              judge_mathvista),
    Benchmark("mmstar", "MMStar", "val",
              "HF Lin-Chen/MMStar (val-*.parquet), VLMEvalKit MMStar.tsv, or JSONL records",
              ("**/val-*.parquet", "**/mmstar*.parquet", "**/MMStar.tsv"), "category", 768,
              judge_mmstar),
    Benchmark("mmmu", "MMMU", "validation",
              "HF MMMU/MMMU (<Subject>/validation-*.parquet), VLMEvalKit MMMU_DEV_VAL.tsv, "
              "or JSONL records", ("**/validation-*.parquet", "**/MMMU_DEV_VAL.tsv"), "subject",
              1024, judge_mmmu),
    Benchmark("m3cot", "M3CoT", "test",
              "HF LightChen2333/M3CoT (test-*.parquet), the repo's test.jsonl + images, or JSONL "
              "records", ("**/test-*.parquet", "**/test.jsonl"), "domain", 1024, judge_m3cot),
    Benchmark("ai2d", "AI2D", "test",
              "HF lmms-lab/ai2d (test-*.parquet), VLMEvalKit AI2D_TEST.tsv, or JSONL records",
              ("**/test-*.parquet", "**/AI2D_TEST.tsv"), "", 768, judge_ai2d),
    Benchmark("chartqa", "ChartQA", "test",
              "HF lmms-lab/ChartQA or HuggingFaceM4/ChartQA (test-*.parquet), the repo's "
              "test/test_human.json + test/test_augmented.json + test/png/, or JSONL records",
              ("**/test-*.parquet", "**/test_human.json", "**/test_augmented.json"), "type", 768,
              judge_chartqa),
)}

# Table 1 of the paper (accuracy %, as published), shown beside our numbers for reference.
_COLUMNS = ("mathvista", "mmstar", "mmmu", "m3cot", "ai2d", "chartqa")
PAPER_TABLE1: dict[str, dict[str, float]] = {label: dict(zip(_COLUMNS, numbers)) for label, numbers in (
    ("InternVL2.5-MPO-8B", (65.0, 60.7, 53.8, 67.5, 84.2, 85.0)),
    ("InternVL2.5-MPO-8B + CoS SFT", (65.9, 61.0, 53.7, 75.7, 81.6, 88.3)),
    ("InternVL2.5-MPO-8B + CoS iterative DPO", (67.8, 63.5, 55.5, 81.0, 84.9, 87.4)),
    ("LLaVA-NeXT-8B", (45.9, 43.1, 36.9, 45.6, 71.5, 69.4)),
    ("LLaVA-NeXT-8B + CoS SFT", (51.4, 54.7, 39.6, 67.4, 76.1, 75.7)),
    ("LLaVA-NeXT-8B + CoS iterative DPO", (54.7, 58.9, 41.8, 71.7, 79.2, 79.1)),
)}


def get(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name.lower()]
    except KeyError:
        raise ChainstepError(f"unknown benchmark {name!r}: choose from {', '.join(BENCHMARKS)}") from None


# ---------------------------------------------------------------- prompts

INSTRUCTIONS = {
    "choice": "Reason step by step, then answer with the option's letter from the given choices.",
    "integer": "Reason step by step, then answer with a single integer.",
    "float": "Reason step by step, then answer with a number with {precision} decimal place(s).",
    "list": "Reason step by step, then answer with a Python list, e.g. [1, 2, 3].",
    "phrase": "Reason step by step, then answer with a single word, phrase or number.",
}


def instruction(record: dict) -> str:
    """The fixed instruction appended to a benchmark question (documented in README)."""
    if record.get("options"):
        return INSTRUCTIONS["choice"]
    answer_type = field(record, "answer_type")
    if answer_type in ("integer", "list"):
        return INSTRUCTIONS[answer_type]
    if answer_type == "float":
        return INSTRUCTIONS["float"].format(precision=_precision(record) or 1)
    return INSTRUCTIONS["phrase"]


# ---------------------------------------------------------------- scoring


def response_answer(text: str | None) -> tuple[str | None, int | None, str | None]:
    """(text the rule sees, steps, format error): the answer span of a step-format response,
    or the whole of a free-form one."""
    if text is None:
        return None, None, "empty"
    if REASONING_START in text:
        try:
            chain = parse(text)
        except FormatError as err:
            return None, None, err.code
        return chain.answer, len(chain.steps), None
    if ANSWER_START in text:
        answer = extract_answer(text)
        return answer, None, None if answer is not None else "missing_answer"
    return text, None, None


def grade(name: str, text: str | None, record: dict, extractor: LLMExtractor | None = None) -> dict:
    """The fields of a predictions row: predicted answer, parsed, format error, steps, correct."""
    bench = get(name)
    candidate, steps, error = response_answer(text)
    if candidate is None:
        return {"predicted": None, "parsed": False, "format_error": error, "steps": steps,
                "correct": 0.0}
    predicted, correct = bench.judge(candidate, record)
    if extractor is not None and (predicted is None or extractor.always(name, candidate, record)):
        extracted = extractor(name, candidate, record)
        if extracted is not None:
            predicted, correct = bench.judge(extracted, record)
    return {"predicted": predicted, "parsed": predicted is not None,
            "format_error": None if predicted is not None else "no_answer_found",
            "steps": steps, "correct": float(correct and predicted is not None)}


def score(name: str, response_text: str | None, record: dict,
          extractor: LLMExtractor | None = None) -> float:
    """1.0 or 0.0 under the benchmark's own rule; an unreadable response scores 0.0."""
    return grade(name, response_text, record, extractor)["correct"]


class LLMExtractor:
    """Answer extraction by a chat model, as MathVista's official pipeline (GPT) and VLMEvalKit's
    multiple-choice fallback do. MathVista asks the model whenever the official quick rules do not
    settle the answer; multiple-choice benchmarks only when the rules find no letter."""

    def __init__(self, client):
        self.client = client
        self.templates = {k: (TEMPLATES / f"extract_{k}.txt").read_text() for k in ("answer", "choice")}

    def always(self, name: str, text: str, record: dict) -> bool:
        return name == "mathvista" and mathvista_quick(text.strip(), record) is None

    def __call__(self, name: str, text: str, record: dict) -> str | None:
        from .client import RemoteError

        options = options_of(record)
        listed = "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options)) or "(none)"
        kind = "choice" if options and name != "mathvista" else "answer"
        prompt = self.templates[kind].format(question=record.get("question") or "", options=listed,
                                             response=text)
        try:
            reply = self.client.complete([{"role": "user", "content": prompt}]).text.strip()
        except RemoteError:
            return None
        if kind == "choice":
            letter = reply.strip("().: ").upper()[:1]
            return letter if letter and letter in LETTERS[:len(options)] else None
        return reply or None


# ---------------------------------------------------------------- loading


def load(name: str, path: str | Path, image_dir: str | Path | None = None) -> list[dict]:
    """Task records (docs/design.md §2) from a benchmark's files.

    `path` is a file (parquet, JSON, JSONL or VLMEvalKit TSV) or a folder searched for the layouts
    the publishers ship. Images stored inside the files (parquet bytes, TSV base64) are written
    once to `image_dir` (default: `images/` next to the data); several images of one question
    (MMMU) are placed side by side in one. A record whose image is missing keeps `image: None`."""
    bench, path = get(name), Path(path)
    if not path.exists():
        raise ChainstepError(f"{path} does not exist; {bench.title} expects {bench.layouts}")
    files = [path] if path.is_file() else _layout_files(bench, path)
    if not files:
        raise ChainstepError(f"no {bench.title} files under {path}; expected {bench.layouts}")
    image_dir = Path(image_dir) if image_dir else (path if path.is_dir() else path.parent) / "images"
    records, seen = [], set()
    for file in files:
        for number, row in enumerate(read_rows(file), start=1):
            record = _to_record(bench, row, file, number, image_dir)
            if record["id"] in seen:
                raise ChainstepError(f"{file}:{number}: duplicate id {record['id']!r}")
            seen.add(record["id"])
            records.append(record)
    if not records:
        raise ChainstepError(f"{path}: no records; {bench.title} expects {bench.layouts}")
    return records


def _layout_files(bench: Benchmark, folder: Path) -> list[Path]:
    """The files of the first layout found (a folder holding parquet and JSON copies of the same
    records is read once)."""
    found = [f for p in bench.patterns for f in sorted(folder.glob(p))]
    return sorted({f for f in found if f.suffix == found[0].suffix}) if found else []


_ID_KEYS = ("id", "pid", "question_id", "index")
_BULKY = ("image", "decoded_image", "question", "question_stem", "query", "options", "choices",
          "answer", "label",
          *(f"image_{i}" for i in range(1, 8)))


def _to_record(bench: Benchmark, row: dict, file: Path, number: int, image_dir: Path) -> dict:
    where = f"{file}:{number}"
    rid = next((str(row[k]) for k in _ID_KEYS if row.get(k) not in (None, "")), None)
    if rid is None:  # ChartQA and lmms-lab AI2D rows carry no id: split, image, row number
        parts = (row.get("type") or bench.name, Path(str(row.get("imgname") or "")).stem,
                 str(row.get("row", number - 1)))
        rid = "_".join(p for p in parts if p)
    question = row.get("question_stem") or row.get("question") or row.get("query")
    if isinstance(question, str) and "\nOptions: A: " in question and not row.get("options"):
        question, inline = question.split("\nOptions: A: ", 1)  # MMStar's HF layout
        row = {**row, "options": re.split(r", [B-F]: ", inline)}
    if row.get("context"):  # M3CoT
        question = f"{row['context']}\n{question}"
    if not isinstance(question, str) or not question.strip():
        raise ChainstepError(f"{where} (id {rid}): no question text; {bench.title} expects {bench.layouts}")
    answer = row.get("answer", row.get("label"))
    if answer is None:
        raise ChainstepError(f"{where} (id {rid}): no answer")
    options = _options(row)
    if isinstance(answer, str) and answer.startswith("[") and bench.name in ("mmmu", "chartqa"):
        try:
            answer = [str(a) for a in ast.literal_eval(answer)]
        except (ValueError, SyntaxError):
            pass
    if bench.name == "ai2d" and options and str(answer).isdigit():  # lmms-lab stores the index
        answer = LETTERS[int(answer)]
    if isinstance(answer, list) and bench.name != "mmmu" and bench.name != "chartqa":
        answer = str(answer[0])
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = LETTERS[int(answer)] if options and bench.name == "m3cot" else str(answer)
    meta = _meta(bench, row, rid)
    record = {"id": rid, "image": row_image(row, rid, file.parent, image_dir), "question": question,
              "options": options or None, "answer": answer, "source": bench.name, "meta": meta}
    meta["instruction"] = instruction(record)
    return record


def _options(row: dict) -> list[str]:
    options = row.get("options", row.get("choices"))
    if isinstance(options, str):  # MMMU's parquet stores a Python list literal
        try:
            options = ast.literal_eval(options)
        except (ValueError, SyntaxError):
            options = None
    return [str(o) for o in options] if options else []


def _meta(bench: Benchmark, row: dict, rid: str) -> dict:
    meta = {k: v for k, v in row.items() if k not in _BULKY and k not in _ID_KEYS
            and isinstance(v, (str, int, float, bool, list, dict, type(None)))}
    if isinstance(meta.get("metadata"), dict):  # MathVista nests task, source, skills...
        meta.update(meta.pop("metadata"))
    if bench.name == "mmmu" and "subject" not in meta:
        meta["subject"] = re.sub(r"^[a-z]+_|_\d+$", "", rid)
    if bench.name == "chartqa" and "type" not in meta and "human_or_machine" in meta:
        meta["type"] = "human_test" if meta["human_or_machine"] == 0 else "augmented_test"
    meta["family"] = str(meta.get(bench.category) or bench.name) if bench.category else bench.name
    return meta
