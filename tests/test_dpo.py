"""Pair building, the preference collator, reset-to-SFT rounds, and a 2-process DDP step."""

import json
import os
import subprocess
import sys

import pytest
import torch

from chainstep.dpo import (
    DPOConfig,
    PreferenceCollator,
    build_pairs,
    iterative_dpo,
    pair_stats,
    sample_scores,
    train_dpo,
    train_rft,
)
from chainstep.errors import ChainstepError
from chainstep.inputs import encode_example
from chainstep.models import load
from chainstep.prm import PRM
from chainstep.records import replace_jsonl
from chainstep.steps import Chain, Step, parse, render


def _row(qid, j, correct=False, text=None, tokens=10, parsed=True):
    return {"id": f"{qid}#{j}", "question_id": qid, "response": text or f"{qid} chain {j}",
            "correct": correct, "tokens": tokens, "parsed": parsed}


def test_pairs_best_against_worst_above_threshold_only():
    rows = [_row("q", 0), _row("q", 1, True), _row("q", 2)]
    pairs = build_pairs(rows, [0.5, 0.9, 0.1], threshold=0.5)
    assert [(p["chosen_id"], p["rejected_id"]) for p in pairs] == [("q#1", "q#2")]
    assert pairs[0]["chosen_score"] - pairs[0]["rejected_score"] == pytest.approx(0.8)
    assert build_pairs(rows, [0.5, 0.9, 0.1], threshold=0.8) == []  # the gap must exceed t


def test_pairs_ties_and_questions_without_a_pair():
    rows = [_row("a", 0), _row("a", 1), _row("b", 0), _row("b", 1), _row("b", 2)]
    pairs = build_pairs(rows, [0.4, 0.4, 0.7, 0.7, 0.2], threshold=0.1)
    assert [p["question_id"] for p in pairs] == ["b"]  # all-equal scores give no pair
    assert pairs[0]["chosen_id"] == "b#0"  # tied best: sampling order decides
    stats = pair_stats(pairs, questions=2)
    assert stats["questions_with_pairs"] == 1 and stats["pairs"] == 1
    assert stats["mean_gap"] == pytest.approx(0.5)


def test_several_pairs_per_question_stop_when_the_gap_closes():
    rows = [_row("q", j) for j in range(6)]
    scores = [0.9, 0.8, 0.5, 0.45, 0.2, 0.1]
    pairs = build_pairs(rows, scores, threshold=0.3, pairs_per_question=3)
    assert [(p["chosen_id"], p["rejected_id"]) for p in pairs] == [("q#0", "q#5"), ("q#1", "q#4")]


def test_a_chosen_chain_must_parse():
    rows = [_row("q", 0, parsed=False), _row("q", 1), _row("q", 2), _row("q", 3, parsed=False)]
    pairs = build_pairs(rows, [0.9, 0.6, 0.3, 0.1], threshold=0.1, pairs_per_question=2)
    assert [(p["chosen_id"], p["rejected_id"]) for p in pairs] == [("q#1", "q#3")]  # then they cross
    only_broken = [_row("r", 0, parsed=False), _row("r", 1, parsed=False)]
    assert build_pairs(only_broken, [0.9, 0.1], threshold=0.0) == []


def test_identical_texts_are_never_paired():
    rows = [_row("q", 0, text="same"), _row("q", 1, text="same")]
    assert build_pairs(rows, [0.9, 0.1], threshold=0.0) == []


def test_sample_scores_by_source(sft_model_dir, train_records):
    record = train_records[0]
    chain = Chain([Step("Count red", "Red shapes: 2", "ok"), Step("Add", "2 + 1 = 3", "ok")], "3")
    rows = [{"id": "x#0", "question_id": record["id"], "response": render(chain), "correct": True},
            {"id": "x#1", "question_id": record["id"], "response": "no chain", "correct": False}]
    assert sample_scores(rows, [record], "outcome", None) == [1.0, 0.0]
    prm = PRM.from_dir(sft_model_dir)
    s = prm.score([record], [rows[0]["response"]])[0]
    step_answer = sample_scores(rows, [record], "prm", prm)
    answer_only = sample_scores(rows, [record], "prm_answer", prm)
    assert step_answer[0] == pytest.approx(0.2 * sum(s.steps) / len(s.steps) + 0.8 * s.answer, abs=1e-5)
    assert answer_only[0] == pytest.approx(s.answer, abs=1e-5)
    with pytest.raises(ChainstepError, match="needs a PRM"):
        sample_scores(rows, [record], "prm", None)


def test_verified_source_counts_a_lucky_guess_as_wrong():
    rows = [{"correct": True, "steps_right": True}, {"correct": True, "steps_right": False},
            {"correct": False, "steps_right": True}, {"correct": True, "steps_right": None}]
    assert sample_scores(rows, [], "verified", None) == [1.0, 0.0, 0.0, 1.0]  # None: no step facts
    assert sample_scores(rows, [], "outcome", None) == [1.0, 1.0, 0.0, 1.0]


def test_config_rejects_unknown_sources():
    with pytest.raises(ChainstepError, match="pair_source"):
        DPOConfig(pair_source="judge")
    with pytest.raises(ChainstepError, match="two chains"):
        DPOConfig(samples=1)


def test_collator_encodes_chosen_then_rejected_like_sft(sft_model_dir, train_records):
    _, processor = load(sft_model_dir)
    rows = [{"record": json.dumps(r), "image": r["image"], "chosen": f"good {i}",
             "rejected": f"bad answer {i}"} for i, r in enumerate(train_records[:2])]
    batch = PreferenceCollator(processor)(rows)
    assert batch["input_ids"].shape[0] == 4 and batch["pixel_values"].shape[0] == 4
    first, second = train_records[:2]
    expected = [(first, "good 0"), (second, "good 1"), (first, "bad answer 0"), (second, "bad answer 1")]
    for i, (record, side) in enumerate(expected):
        want = encode_example(processor, record, side)
        n = want["input_ids"].shape[0]
        assert batch["input_ids"][i, :n].tolist() == want["input_ids"].tolist()
        assert batch["completion_mask"][i, :n].tolist() == want["labels"].ne(-100).long().tolist()
        assert batch["completion_mask"][i, n:].sum() == 0  # padding is not a completion
        assert "labels" not in batch


def _pairs_file(tmp_path, records, count=4):
    good = [render(Chain([Step("Read", f"Value: {i}", "ok")], str(i))) for i in range(count)]
    pairs = [{"id": f"{r['id']}#p0", "question_id": r["id"], "chosen": g, "rejected": "wrong"}
             for r, g in zip(records, good)]
    path = tmp_path / "pairs.jsonl"
    replace_jsonl(path, pairs)
    return path


def test_train_dpo_moves_the_policy_towards_chosen(sft_model_dir, train_records, tmp_path):
    records = train_records[:4]
    path = _pairs_file(tmp_path, records)
    cfg = DPOConfig(max_steps=5, epochs=3, per_device_train_batch_size=4, learning_rate=1e-3, save_steps=100)
    out = train_dpo(sft_model_dir, path, {r["id"]: r for r in records}, tmp_path / "dpo", cfg)
    meta = json.loads((out / "chainstep.json").read_text())
    assert meta["num_pairs"] == 4 and (out / meta["trained_from"]).resolve() == sft_model_dir.resolve()
    assert meta["train_loss_last"] < meta["train_loss_first"]
    assert meta["dpo"]["max_steps"] == 3  # 3 epochs of 4 pairs at batch 4 come before 5 steps
    before, processor = load(sft_model_dir)
    after, _ = load(out)
    pairs = [json.loads(line) for line in path.read_text().splitlines()]
    margin = [_logp(m, processor, records, pairs, "chosen") - _logp(m, processor, records, pairs, "rejected")
              for m in (before, after)]
    assert margin[1] > margin[0]  # chosen rose relative to rejected


def _weights(model_dir) -> dict[str, torch.Tensor]:
    return dict(load(model_dir)[0].state_dict())


def test_dpo_at_learning_rate_zero_is_a_no_op_and_says_so(sft_model_dir, train_records, tmp_path, capsys):
    records = train_records[:4]
    path = _pairs_file(tmp_path, records)
    cfg = DPOConfig(max_steps=3, epochs=3, per_device_train_batch_size=4, learning_rate=0.0, save_steps=100)
    out = train_dpo(sft_model_dir, path, {r["id"]: r for r in records}, tmp_path / "dpo", cfg)
    before, after = _weights(sft_model_dir), _weights(out)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((out / "chainstep.json").read_text())["weights_changed"] is False
    assert "left every weight unchanged" in capsys.readouterr().err


def test_rft_control_trains_on_the_chosen_chains_with_dpo_steps(sft_model_dir, train_records, tmp_path):
    records = train_records[:4]
    path = _pairs_file(tmp_path, records)
    cfg = DPOConfig(max_steps=5, epochs=3, per_device_train_batch_size=4, learning_rate=1e-3, save_steps=100)
    by_id = {r["id"]: r for r in records}
    out = train_rft(sft_model_dir, path, by_id, tmp_path / "rft", cfg)
    meta = json.loads((out / "chainstep.json").read_text())
    assert meta["weights_changed"] is True and meta["control_for"] == "dpo"
    assert meta["dpo"]["max_steps"] == 3  # the steps DPO takes on the same pairs
    pairs = [json.loads(line) for line in path.read_text().splitlines()]
    before, processor = load(sft_model_dir)
    after, _ = load(out)
    chosen = [_logp(m, processor, records, pairs, "chosen") for m in (before, after)]
    assert chosen[1] > chosen[0]  # the chosen chains became likelier


def _logp(model, processor, records, pairs, side: str) -> float:
    """Summed log-probability of the pairs' chosen or rejected responses."""
    from chainstep.inputs import collate

    by_id = {r["id"]: r for r in records}
    batch = collate([encode_example(processor, by_id[p["question_id"]], p[side]) for p in pairs],
                    processor.tokenizer.pad_token_id)
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits[:, :-1].float()
    target = labels[:, 1:]
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return float((logp * target.ne(-100)).sum())


def _scripted_samples(monkeypatch, n=3):
    """Rounds sample fixed chains (right, wrong, broken per question): pairs then do not depend
    on what the tiny test policy happens to write."""
    def sample(policy, records, path, params, *args, **kwargs):
        out = {}
        for r in records:
            rows = out.setdefault(r["id"], [])
            for j, answer in enumerate([r["answer"], "no such answer", None][:n]):
                text = render(Chain([Step("Read", f"Value: {j}", "ok")], answer)) if answer else "broken"
                rows.append({"id": f"{r['id']}#{j}", "question_id": r["id"], "response": text,
                             "correct": j == 0, "parsed": answer is not None, "steps": 1, "tokens": 20 + j})
        return out

    monkeypatch.setattr("chainstep.dpo.sample_responses", sample)


def test_every_round_restarts_from_sft_and_samples_the_latest_policy(sft_model_dir, train_records, tmp_path,
                                                                     monkeypatch):
    records = train_records[:4]
    _scripted_samples(monkeypatch)
    cfg = DPOConfig(rounds=2, samples=3, pair_source="outcome", max_steps=1, per_device_train_batch_size=2,
                    save_steps=100, min_pairs=2)
    stats = iterative_dpo(sft_model_dir, None, records, tmp_path, cfg, batch_size=16)
    assert stats["dpo-r1"]["policy"] == sft_model_dir.name
    assert stats["dpo-r2"]["policy"] == "dpo-r1"
    for name in ("dpo-r1", "dpo-r2"):
        assert stats[name]["trained"] and stats[name]["pairs"] == 4
        assert stats[name]["chosen_correct"] == 1 and stats[name]["rejected_correct"] == 0
        meta = json.loads((tmp_path / "models" / name / "chainstep.json").read_text())
        start = (tmp_path / "models" / name / meta["trained_from"]).resolve()
        assert start == sft_model_dir.resolve()  # policy and reference reset to SFT
    weights = tmp_path / "models" / "dpo-r2" / "model.safetensors"
    stamp = weights.stat().st_mtime
    again = iterative_dpo(sft_model_dir, None, records, tmp_path, cfg, batch_size=16)
    assert again == stats and weights.stat().st_mtime == stamp  # finished rounds are skipped


def test_a_round_with_too_few_pairs_trains_nothing_and_says_so(sft_model_dir, train_records, tmp_path,
                                                               capsys, monkeypatch):
    records = train_records[:4]
    _scripted_samples(monkeypatch)
    cfg = DPOConfig(rounds=1, samples=3, pair_source="outcome", max_steps=1, min_pairs=8)
    stats = iterative_dpo(sft_model_dir, None, records, tmp_path, cfg, batch_size=16)
    assert stats["dpo-r1"]["pairs"] == 4 and not stats["dpo-r1"]["trained"]
    assert not (tmp_path / "models" / "dpo-r1").exists()  # so no comparison can be made with it
    assert "too little to change the model" in " ".join(capsys.readouterr().err.split())


def test_a_round_without_pairs_trains_nothing(sft_model_dir, train_records, tmp_path):
    cfg = DPOConfig(rounds=1, samples=2, threshold=1.0, max_steps=1, max_tokens=32, pair_source="outcome")
    stats = iterative_dpo(sft_model_dir, None, train_records[:2], tmp_path, cfg, batch_size=8)
    assert stats["dpo-r1"]["pairs"] == 0 and not stats["dpo-r1"]["trained"]
    assert not (tmp_path / "models" / "dpo-r1").exists()


@pytest.mark.slow
def test_two_process_ddp_step(sft_model_dir, suite_dir, train_records, tmp_path):
    """Gloo DDP on CPU: both ranks train on their share of the pairs, rank 0 saves a loadable model."""
    path = _pairs_file(tmp_path, train_records[:8], count=8)
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "chainstep", "dpo", "train", str(sft_model_dir), str(path),
           str(suite_dir / "tasks" / "train.jsonl"), "--out", str(out),
           "--set", "max_steps=2", "--set", "per_device_train_batch_size=2", "--set", "save_steps=100"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / "ddp-checkpoints" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert all(r["pairs_seen"] >= 4 for r in ranks)  # 2 steps x 2 pairs each
    assert ranks[0]["pid"] != ranks[1]["pid"]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]  # gradients were all-reduced
    meta = json.loads((out / "chainstep.json").read_text())
    assert meta["world_size"] == 2
    model, _ = load(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_step_pairs_part_at_the_first_wrong_step_and_train_on_what_differs(train_records, tiny_model_dir):
    import random

    from chainstep.dpo import PreferenceCollator, step_pairs
    from chainstep.perturb import perturb
    from chainstep.teacher import ProgrammaticTeacher

    records, rows = {}, []
    for record in train_records[:12]:
        chain = ProgrammaticTeacher().chain(record)
        wrong = perturb(record, chain, random.Random(record["id"]))
        if wrong.chain.answer == chain.answer:
            continue
        records[record["id"]] = record
        rows += [{"id": f"{record['id']}#0", "question_id": record["id"], "response": render(chain),
                  "correct": True, "steps_right": True, "parsed": True, "tokens": 1, "first": None},
                 {"id": f"{record['id']}#1", "question_id": record["id"], "response": render(wrong.chain),
                  "correct": False, "steps_right": False, "parsed": True, "tokens": 1,
                  "first": wrong.first_error}]
    pairs = step_pairs(rows, records)
    assert len(pairs) == len(records) >= 4
    firsts = {r["question_id"]: r["first"] for r in rows if r["first"] is not None}
    for pair in pairs:
        assert pair["step"] == firsts[pair["question_id"]]  # where the error was put in
        assert pair["prefix"].count("<|reasoning_step_end|>") == pair["step"]
        assert pair["chosen"] != pair["rejected"] and parse(pair["prefix"] + pair["chosen"])
    assert step_pairs([{**r, "correct": True, "steps_right": True} for r in rows], records) == []
    lucky = step_pairs([{**r, "correct": True} for r in rows], records)  # a right answer after a wrong step
    assert len(lucky) == len(pairs) and all(p["rejected_correct"] for p in lucky)

    pair = max(pairs, key=lambda p: p["step"])
    row = {"record": json.dumps(records[pair["question_id"]]), "prefix": pair["prefix"],
           "chosen": pair["chosen"], "rejected": pair["rejected"]}
    processor = load(tiny_model_dir("llava"))[1]
    batch = PreferenceCollator(processor)([row])
    tok = processor.tokenizer
    for i, side in enumerate(("chosen", "rejected")):
        marked = batch["completion_mask"][i].bool()
        want = tok(pair[side], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert batch["input_ids"][i][marked].tolist() == want  # the shared steps read as prompt
    with pytest.raises(ChainstepError, match="pair_source=verified"):
        DPOConfig(pairs="step", pair_source="prm")
