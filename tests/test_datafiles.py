"""Inputs made elsewhere (LLaVA / ShareGPT JSON, HF parquet) and the conversation export."""

import json
import shutil

import pytest

from chainstep.construct import construct
from chainstep.datafiles import export_conversations, load_inputs
from chainstep.errors import ChainstepError
from chainstep.records import read_jsonl
from chainstep.teacher import ProgrammaticTeacher


def test_llava_and_sharegpt_conversations_become_task_records(train_records, tmp_path):
    record = train_records[0]
    shutil.copy(record["image"], tmp_path / "a.png")
    llava = [{"id": "x1", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "4"}]}]
    sharegpt = [{"images": ["a.png"], "messages": [
        {"role": "user", "content": "<image>How many?"}, {"role": "assistant", "content": "4"}]}]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    (tmp_path / "sharegpt.json").write_text(json.dumps(sharegpt))
    [a] = load_inputs(tmp_path / "llava.json")
    [b] = load_inputs(tmp_path / "sharegpt.json")
    assert (a["id"], a["question"], a["answer"]) == ("x1", "How many?", "4")
    assert a["image"] == str(tmp_path / "a.png")
    assert (b["id"], b["question"], b["answer"]) == ("sharegpt-0", "How many?", "4")


def test_hf_parquet_with_renamed_columns_and_embedded_images(train_records, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = open(train_records[0]["image"], "rb").read()
    pq.write_table(pa.Table.from_pylist([{"query": "How many?", "label": "4", "img": {"bytes": data}}]),
                   tmp_path / "train.parquet")
    columns = {"question": "query", "answer": "label", "image": "img"}
    [record] = load_inputs(tmp_path / "train.parquet", columns, image_dir=tmp_path / "images")
    assert (record["question"], record["answer"]) == ("How many?", "4")
    assert open(record["image"], "rb").read()[:4] == b"\x89PNG"
    with pytest.raises(ChainstepError, match=r"train.parquet row 1 \(id train-0\): no question or answer; "
                                             "columns read: question=question, answer=answer"):
        load_inputs(tmp_path / "train.parquet")


def test_our_own_task_records_pass_through(suite_dir):
    records = load_inputs(suite_dir / "tasks" / "train.jsonl")
    assert records[0]["meta"]["steps"]  # the scene facts the programmatic teacher needs


def test_export_in_llava_and_sharegpt_layouts(train_records, tmp_path):
    construct(train_records[:3], tmp_path, ProgrammaticTeacher())
    rows = read_jsonl(tmp_path / "sft.jsonl")
    llava = export_conversations(rows, "llava")
    assert llava[0]["conversations"][0]["value"].startswith("<image>\n" + rows[0]["question"])
    assert llava[0]["conversations"][1] == {"from": "gpt", "value": rows[0]["response"]}
    sharegpt = export_conversations(rows, "sharegpt")
    assert sharegpt[0]["images"] == [rows[0]["image"]]
    assert [m["role"] for m in sharegpt[0]["messages"]] == ["user", "assistant"]
    # a round trip: the exported file is an input again
    (tmp_path / "export.json").write_text(json.dumps(llava))
    again = load_inputs(tmp_path / "export.json")
    assert [r["answer"] for r in again] == [r["response"] for r in rows]
