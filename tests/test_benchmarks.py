import io
import json
from pathlib import Path

import pytest
from PIL import Image

from chainstep import benchmarks
from chainstep.benchmarks import BENCHMARKS, LLMExtractor, grade, load, score
from chainstep.errors import ChainstepError
from chainstep.steps import Chain, Step, render

# real records and official-scorer verdicts, copied from ../shared/benchmarks so a clone checks them
DATA = Path(__file__).resolve().parent / "data" / "benchmarks"
SAMPLES = {"mathvista": "mathvista/testmini_sample.jsonl", "mmstar": "mmstar/val_sample.jsonl",
           "mmmu": "mmmu/val_sample.jsonl", "m3cot": "m3cot/test_sample.jsonl",
           "ai2d": "ai2d/test_sample.jsonl", "chartqa": "chartqa/test_sample.jsonl"}


def shared(relative: str) -> Path:
    path = DATA / relative
    assert path.exists(), f"{path} is missing from tests/data"
    return path


def cases(name: str) -> list[dict]:
    return [json.loads(line) for line in shared(f"{name}/scorer_cases.jsonl").read_text().splitlines()
            if line.strip()]


def step_response(answer: str) -> str:
    return render(Chain([Step("Read the figure", "Value: 3", "Matches the image")], answer))


# ---------------------------------------------------------------- loaders on real records


@pytest.mark.parametrize("name", list(SAMPLES))
def test_each_loader_reads_the_real_records(name, tmp_path):
    path = shared(SAMPLES[name])
    raw = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = load(name, path, image_dir=tmp_path)
    assert [r["id"] for r in records] == [str(r["id"]) for r in raw]
    for record, row in zip(records, raw):
        assert record["source"] == name and record["meta"]["family"]
        assert record["answer"] == row["answer"]
        assert record["options"] == (row["options"] or None)
        assert record["meta"]["instruction"].startswith("Reason step by step, then answer with")
        if row["image"]:
            assert Path(record["image"]).is_file()
            Image.open(record["image"]).verify()
        else:
            assert record["image"] is None


def test_per_category_fields_follow_each_benchmark(tmp_path):
    mmmu = load("mmmu", shared(SAMPLES["mmmu"]), tmp_path)
    assert mmmu[0]["meta"]["family"] == "Biology"
    mathvista = load("mathvista", shared(SAMPLES["mathvista"]), tmp_path)
    assert mathvista[0]["meta"]["family"] == "textbook question answering"
    assert mathvista[0]["meta"]["precision"] == 1
    chartqa = load("chartqa", shared(SAMPLES["chartqa"]), tmp_path)
    assert {r["meta"]["family"] for r in chartqa} == {"human_test", "augmented_test"}
    mmstar = load("mmstar", shared(SAMPLES["mmstar"]), tmp_path)
    assert "Options:" not in mmstar[0]["question"] and mmstar[0]["meta"]["family"] == "coarse perception"


def test_a_record_without_question_text_is_named(tmp_path):
    with pytest.raises(ChainstepError, match=r"val_open_answers_only.jsonl:1 \(id validation_.*no question"):
        load("mmmu", shared("mmmu/val_open_answers_only.jsonl"), tmp_path)


def test_wrong_path_or_layout_says_what_was_expected(tmp_path):
    with pytest.raises(ChainstepError, match="does not exist; MathVista expects .*testmini"):
        load("mathvista", tmp_path / "nowhere")
    with pytest.raises(ChainstepError, match="no MMMU files under .*validation-"):
        load("mmmu", tmp_path)
    with pytest.raises(ChainstepError, match="unknown benchmark 'vqa'"):
        load("vqa", tmp_path)


# ---------------------------------------------------------------- publishers' layouts


def _png_bytes(colour: str, size=(24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_hf_parquet_layouts_with_embedded_images(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "MMMU" / "Art"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{
        "id": "validation_Art_3", "question": "Which is older? <image 1> <image 2>",
        "options": "['the left', 'the right']", "answer": "B", "question_type": "multiple-choice",
        "image_1": {"bytes": _png_bytes("red"), "path": "a.png"},
        "image_2": {"bytes": _png_bytes("blue"), "path": "b.png"}, "image_3": None}]),
        folder / "validation-00000-of-00001.parquet")
    [record] = load("mmmu", tmp_path / "MMMU", image_dir=tmp_path / "img")
    assert record["options"] == ["the left", "the right"] and record["meta"]["family"] == "Art"
    with Image.open(record["image"]) as image:  # two images side by side
        assert image.size == (48, 16) and image.getpixel((30, 5)) == (0, 0, 255)

    folder = tmp_path / "ai2d" / "data"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"question": "Which organ?", "options": ["liver", "heart"],
                                          "answer": "1", "image": {"bytes": _png_bytes("green")}}]),
                   folder / "test-00000-of-00001.parquet")
    [record] = load("ai2d", tmp_path / "ai2d", image_dir=tmp_path / "img")
    assert record["answer"] == "B" and record["id"] == "ai2d_0" and Path(record["image"]).is_file()


def test_original_chartqa_and_mathvista_json_layouts(tmp_path):
    test = tmp_path / "ChartQA Dataset" / "test"
    (test / "png").mkdir(parents=True)
    (test / "png" / "41699051005347.png").write_bytes(_png_bytes("white"))
    rows = [{"imgname": "41699051005347.png", "query": "How many food item is shown?", "label": "14"}]
    (test / "test_human.json").write_text(json.dumps(rows))
    (test / "test_augmented.json").write_text(json.dumps(rows))
    records = load("chartqa", tmp_path / "ChartQA Dataset")
    assert [r["id"] for r in records] == ["augmented_test_41699051005347_0", "human_test_41699051005347_0"]
    assert all(Path(r["image"]).name == "41699051005347.png" for r in records)

    data = tmp_path / "MathVista" / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "1.jpg").write_bytes(_png_bytes("white"))
    (data / "testmini.json").write_text(json.dumps({"1": {
        "question": "How far?", "image": "images/1.jpg", "choices": None, "answer": "1.2",
        "question_type": "free_form", "answer_type": "float", "precision": 1,
        "metadata": {"task": "textbook question answering"}}}))
    [record] = load("mathvista", tmp_path / "MathVista")
    assert record["id"] == "1" and record["image"].endswith("images/1.jpg")
    assert record["meta"]["instruction"].endswith("with 1 decimal place(s).")


def test_vlmevalkit_tsv_layout(tmp_path):
    import base64

    image = base64.b64encode(_png_bytes("white")).decode()
    header = "index\tquestion\tA\tB\tC\tD\tanswer\tcategory\timage\n"
    row = f"7\tWhat colour?\tred\twhite\tnan\tnan\tB\tcoarse perception\t{image}\n"
    (tmp_path / "MMStar.tsv").write_text(header + row + "8\tWhich?\tred\twhite\t\t\tA\tmath\t7\n")
    record, again = load("mmstar", tmp_path, image_dir=tmp_path / "img")
    assert record["options"] == ["red", "white"] and record["answer"] == "B"
    assert Image.open(record["image"]).size == (24, 16)
    assert Image.open(again["image"]).size == (24, 16)  # "7": the image of row 7


# ---------------------------------------------------------------- official verdicts


def agreement(name: str, verdicts: list[tuple[str | None, dict, bool]]) -> None:
    wrong = [(text, want) for text, record, want in verdicts if score(name, text, record) != float(want)]
    assert not wrong, f"{len(wrong)}/{len(verdicts)} verdicts differ from the official scorer: {wrong[:3]}"


def test_mmstar_agrees_with_the_official_scorer():
    rows = cases("mmstar")
    agreement("mmstar", [(c["response"], {"answer": c["answer"], "options": None},
                          c["correct_official_mmstar_rule"]) for c in rows])


def test_ai2d_agrees_with_lmms_eval():
    rows = cases("ai2d")
    agreement("ai2d", [(c["response"], {"answer": c["answer"], "options": ["a", "b", "c", "d"]},
                        c["correct_lmms_eval_rule"]) for c in rows])


def test_mmmu_agrees_with_the_official_parser_and_never_guesses():
    rows = cases("mmmu")
    verdicts = []
    for c in rows:
        record = {"answer": c["answer"], "question_type": c["question_type"],
                  "options": list(c["index2ans"].values()) if "index2ans" in c else None}
        verdicts.append((c["response"], record, bool(c["correct"])))  # random fallback -> wrong
        if c["question_type"] == "multiple-choice":
            parsed = grade("mmmu", c["response"], record)["predicted"]
            assert parsed == (None if c["random_fallback"] else c["parsed_pred"]), c["response"]
    agreement("mmmu", verdicts)


def test_m3cot_agrees_with_judge_answer():
    rows = cases("m3cot")
    for c in rows:
        record = {"answer": c["answer"], "options": c["choices"]}
        got = grade("m3cot", c["response"], record)
        assert (got["predicted"] or "FAILED") == c["extracted"], c["id"]
    agreement("m3cot", [(c["response"], {"answer": c["answer"], "options": c["choices"]}, c["correct"])
                        for c in rows])


def _mathvista_record(case: dict) -> dict:
    return {"answer": case["gt_answer"], "options": case["choices"], "question_type": case["question_type"],
            "answer_type": case["answer_type"], "precision": case["precision"]}


def test_mathvista_normalisation_agrees_with_the_official_code():
    for c in cases("mathvista"):
        record = _mathvista_record(c)
        prediction, correct = benchmarks.mathvista_verdict(c["extracted"], record)
        assert (prediction, correct) == (c["normalized_prediction"], c["correct"]), c


def test_mathvista_rules_extract_what_the_official_gpt_demo_extracts():
    demos = [c for c in cases("mathvista") if "response" in c]
    assert demos
    for c in demos:
        assert benchmarks.mathvista_extract(c["response"], _mathvista_record(c)) == c["extracted"]
        assert score("mathvista", c["response"], _mathvista_record(c)) == float(c["correct"])


def test_mathvista_choice_stated_by_value_maps_to_the_nearest_option():
    """No letter and not the option's exact text ("45" for "45°"): the official pipeline extracts
    the value and maps it to the nearest option by edit distance; rules used to score it wrong."""
    record = {"answer": "45°", "options": ["30°", "45°", "60°", "90°"], "question_type": "multi_choice",
              "answer_type": "text", "precision": None}
    assert score("mathvista", "The angle is 45", record) == 1.0
    assert score("mathvista", "So the answer is 60.", record) == 0.0
    assert score("mathvista", step_response("45"), record) == 1.0
    assert benchmarks.mathvista_extract("I cannot tell.", record) is None


def test_chartqa_relaxed_accuracy_in_the_official_argument_order():
    rows = cases("chartqa")
    agreement("chartqa", [(c["prediction"], {"answer": c["targets"]}, c["correct"]) for c in rows])
    # relaxed accuracy is asymmetric: the tolerance is relative to the target
    assert benchmarks.relaxed_correctness("105.2", "100")
    assert not benchmarks.relaxed_correctness("100", "105.2")


def test_chartqa_best_over_references():
    assert score("chartqa", "Inspired", {"answer": ["happy", "inspired"]}) == 1.0
    assert score("chartqa", "3", {"answer": ["14", "12"]}) == 0.0


# ---------------------------------------------------------------- step format


@pytest.mark.parametrize("name,record,answer", [
    ("mmstar", {"answer": "C", "options": ["a", "b", "c", "d"]}, "C"),
    ("ai2d", {"answer": "B", "options": ["a", "b"]}, "B"),
    ("mmmu", {"answer": "A", "options": ["x", "y"], "question_type": "multiple-choice"}, "A"),
    ("mmmu", {"answer": "0.10", "options": None, "question_type": "open"}, "0.1"),
    ("m3cot", {"answer": "B", "options": ["x", "y", "z"]}, "B"),
    ("mathvista", {"answer": "8/11", "options": ["3/11", "8/11"], "question_type": "multi_choice",
                   "answer_type": "text"}, "B"),
    ("mathvista", {"answer": "1.2", "options": None, "question_type": "free_form", "answer_type": "float",
                   "precision": 1}, "1.25"),
    ("chartqa", {"answer": ["62"]}, "61"),
])
def test_step_format_responses_are_scored_on_their_answer_span(name, record, answer):
    good = grade(name, step_response(answer), record)
    assert good["correct"] == 1.0 and good["steps"] == 1 and good["parsed"]
    broken = step_response(answer).replace("<|reasoning_end|>", "")
    bad = grade(name, broken, record)
    assert bad["correct"] == 0.0 and not bad["parsed"] and bad["format_error"]


def test_unreadable_free_text_counts_wrong_and_unparsed():
    record = {"answer": "B", "options": ["$6", "$7", "$8", "$9"], "question_type": "multiple-choice"}
    got = grade("mmmu", "$7", record)  # MMMU's code would pick a random letter here
    assert got == {"predicted": None, "parsed": False, "format_error": "no_answer_found", "steps": None,
                   "correct": 0.0}
    assert score("mmmu", None, record) == 0.0


def test_plain_dict_or_task_record_with_meta_score_alike(tmp_path):
    [record] = [r for r in load("mathvista", shared(SAMPLES["mathvista"]), tmp_path) if r["id"] == "1"]
    flat = {"answer": "1.2", "options": None, "question_type": "free_form", "answer_type": "float",
            "precision": 1}
    for text in ("1.2", "The answer is 1.24", "It is 3.5", "no idea"):
        assert score("mathvista", text, record) == score("mathvista", text, flat)


# ---------------------------------------------------------------- LLM extraction


def test_llm_extraction_for_mathvista_and_as_the_choice_fallback(endpoint):
    from chainstep.client import ChatClient

    server, url = endpoint("(B)")
    extractor = LLMExtractor(ChatClient(url, "judge", max_retries=0))
    record = {"question": "Which?", "answer": "B", "options": ["red", "blue"]}
    assert score("mmstar", "The blue one", record) == 0.0
    assert score("mmstar", "The blue one", record, extractor) == 1.0
    assert "The blue one" in server.requests[-1]["messages"][0]["content"]
    asked = len(server.requests)
    assert score("mmstar", "B", record, extractor) == 1.0 and len(server.requests) == asked  # rules sufficed

    server, url = endpoint("0.13")
    extractor = LLMExtractor(ChatClient(url, "judge", max_retries=0))
    record = {"question": "How much?", "answer": "0.13", "options": None, "question_type": "free_form",
              "answer_type": "float", "precision": 2}
    assert score("mathvista", "Luca needs thirteen cents, i.e. $0.13 in all.", record, extractor) == 1.0
    assert "Extracted answer:" in server.requests[-1]["messages"][0]["content"]


def test_llm_extraction_failure_keeps_the_rule_verdict(endpoint):
    from chainstep.client import ChatClient

    server, url = endpoint("", fail_first=100, status=503)
    extractor = LLMExtractor(ChatClient(url, "judge", max_retries=0))
    record = {"question": "Which?", "answer": "B", "options": ["red", "blue"]}
    assert grade("mmstar", "The blue one", record, extractor)["parsed"] is False


def test_every_benchmark_has_a_budget_and_the_paper_numbers():
    for name, bench in BENCHMARKS.items():
        assert bench.max_tokens >= 512
        assert all(name in row for row in benchmarks.PAPER_TABLE1.values())


# ---------------------------------------------------------------- full eval with a tiny model


def with_images(name: str, tmp_path: Path, count: int) -> Path:
    """The first `count` real records that ship with their image, as a JSONL of absolute paths."""
    path = shared(SAMPLES[name])
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [{**r, "image": str(path.parent / r["image"])} for r in rows if r["image"]][:count]
    out = tmp_path / f"{name}.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_a_tiny_model_runs_the_full_benchmark_eval(sft_model_dir, tmp_path):
    from typer.testing import CliRunner

    from chainstep.cli import app
    from chainstep.records import prompt_text

    data = with_images("mmmu", tmp_path, 3)
    out = tmp_path / "eval"
    args = ["eval", str(sft_model_dir), "--benchmark", "mmmu", "--data", str(data), "--out", str(out),
            "--max-tokens", "48"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    [row] = json.loads((out / "metrics.json").read_text())["results"]
    assert (row["benchmark"], row["split"], row["num_questions"]) == ("mmmu", "mmmu", 3)
    assert row["max_tokens"] == 48
    assert row["extraction"] == "rules" and row["instructions"] == [benchmarks.INSTRUCTIONS["choice"]]
    records = {r["id"]: r for r in load("mmmu", data)}
    assert set(row["per_family"]) == {r["meta"]["family"] for r in records.values()}
    preds = [json.loads(line) for line in (out / f"{sft_model_dir.name}-mmmu.jsonl").read_text().splitlines()]
    assert len(preds) == 3
    for pred in preds:  # every prediction graded by MMMU's own rule
        assert pred["correct"] == score("mmmu", pred["response"], records[pred["id"]])
        assert prompt_text(records[pred["id"]]).endswith(benchmarks.INSTRUCTIONS["choice"])

    sc = CliRunner().invoke(app, ["eval", str(sft_model_dir), "--benchmark", "ai2d", "--data",
                                  str(with_images("ai2d", tmp_path, 2)), "--out", str(out),
                                  "--strategy", "sc", "--n", "2", "--max-tokens", "32"])
    assert sc.exit_code == 0, sc.output
    rows = json.loads((out / "metrics.json").read_text())["results"]
    assert {(r["split"], r["strategy"], r["n"]) for r in rows} == {("mmmu", "greedy", 1), ("ai2d", "sc", 2)}


def test_benchmark_eval_refuses_records_without_images(tmp_path):
    from typer.testing import CliRunner

    from chainstep.cli import app

    result = CliRunner().invoke(app, ["eval", str(tmp_path / "model"), "--benchmark", "mathvista", "--data",
                                      str(shared(SAMPLES["mathvista"])), "--out", str(tmp_path)])
    assert isinstance(result.exception, ChainstepError)
    assert "25 of 25 MathVista records" in str(result.exception)
    assert "no image (first: id 1)" in str(result.exception)
    assert not (tmp_path / "metrics.json").exists()
