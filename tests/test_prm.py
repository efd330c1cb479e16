import math

import pytest
import torch

from chainstep import models
from chainstep.config import PRMConfig
from chainstep.errors import ChainstepError
from chainstep.inputs import collate
from chainstep.prm import (
    LIKELIHOOD_OFFSET,
    PRM,
    batches,
    encode_prm_example,
    head_logits,
    hidden_states,
    judge_logits,
    judged_span,
    marker_ids,
    tag_ids,
)
from chainstep.prm_metrics import auroc, evaluate_prm, ranking_auroc, ranking_pairs
from chainstep.prm_train import carries_gradient, merge_labels, prm_loss, train_prm
from chainstep.records import JsonlWriter, read_jsonl
from chainstep.scoring import score_samples
from chainstep.steps import ANSWER_END, ANSWER_START, STEP_END, THOUGHT_END, THOUGHT_START, parse
from chainstep.teacher import ProgrammaticTeacher
from chainstep.verifier import CheckedVerifier


@pytest.fixture(scope="module")
def llava(tiny_model_dir):
    return models.load(tiny_model_dir("llava"))


def _rows(records, n=3):
    teacher = ProgrammaticTeacher()
    return [{**r, "response": teacher.explain(r)} for r in records[:n]]


def test_targets_sit_on_the_tag_after_every_step_and_the_answer(llava, train_records):
    _, processor = llava
    row = _rows(train_records, 1)[0]
    steps = len(parse(row["response"]).steps)
    example = encode_prm_example(processor, row, row["response"], [1] * steps + [0])
    where = example["prm_targets"].ge(0).nonzero().flatten().tolist()
    before = processor.tokenizer.convert_ids_to_tokens([example["input_ids"][i - 1] for i in where])
    assert before == [STEP_END] * steps + [ANSWER_END]
    assert example["prm_targets"][where].tolist() == [1.0] * steps + [0.0]
    with pytest.raises(ChainstepError, match=f"2 labels for {steps + 1} step tags"):
        encode_prm_example(processor, row, row["response"], [1, 0])


def test_a_tag_the_response_spells_itself_is_not_a_tag(llava, train_records):
    """`ки` inside step text (a Cyrillic word, or a model spelling the tag) used to add a tag
    position, shifting every label after it and stopping PRM training."""
    _, processor = llava
    row = _rows(train_records, 1)[0]
    steps = len(parse(row["response"]).steps)
    spelled = row["response"].replace("shapes", "шашки ки", 1).replace("bar", "ки", 1)
    assert "ки" in spelled
    example = encode_prm_example(processor, row, spelled, [1] * steps + [0])
    where = example["prm_targets"].ge(0).nonzero().flatten().tolist()
    before = processor.tokenizer.convert_ids_to_tokens([example["input_ids"][i - 1] for i in where])
    assert before == [STEP_END] * steps + [ANSWER_END]


def test_malformed_chains_are_scored_and_counted_not_misread(llava, train_records):
    model, processor = llava
    prm = PRM(model, processor)
    row = _rows(train_records, 1)[0]
    text = row["response"]
    # the answer in the middle, steps after it: the answer score is the answer tag's, not the last tag's
    head, tail = text.split("<|reasoning_proceed|>\n", 1)
    middle = head + "<|answer_start|>3<|answer_end|>\n<|reasoning_proceed|>\n" + tail.split("Answer:")[0]
    scores = prm.score([row, row], [text, middle])
    assert prm.malformed_chains == 1
    assert len(scores[1].steps) == 1 and scores[1].answer is not None
    assert len(scores[0].steps) == len(parse(text).steps)


def test_training_and_scoring_read_the_same_positions(llava, train_records):
    from chainstep.prm_train import _Collator

    model, processor = llava
    rows = [{**r, "labels": [1] * (len(parse(r["response"]).steps) + 1)} for r in _rows(train_records)]
    train_batch = _Collator(processor, soft=False)(rows)
    score_batch = collate([encode_prm_example(processor, r, r["response"]) for r in rows],
                          processor.tokenizer.pad_token_id)
    assert torch.equal(train_batch["prm_targets"].ge(0), score_batch["prm_targets"].ge(0))
    assert torch.equal(train_batch["input_ids"], score_batch["input_ids"])


def test_tag_logits_equal_the_full_lm_head(llava, train_records):
    model, processor = llava
    rows = _rows(train_records, 2)
    batch = collate([encode_prm_example(processor, r, r["response"]) for r in rows],
                    processor.tokenizer.pad_token_id)
    where = batch.pop("prm_targets").ge(0)
    good, bad = tag_ids(processor)[1:]
    with torch.no_grad():
        full = model(**batch).logits[where][:, [good, bad]]
        fast = judge_logits(model, hidden_states(model, batch), batch["input_ids"], where, (good, bad), "tag",
                            marker_ids(processor))
    assert torch.allclose(full, fast, atol=1e-5)


def test_loss_gradient_flows_from_tag_positions_only(llava, train_records):
    model, processor = llava
    rows = _rows(train_records, 2)
    batch = collate([encode_prm_example(processor, r, r["response"], [1] * 5) for r in rows],
                    processor.tokenizer.pad_token_id)
    targets = batch.pop("prm_targets")
    where = targets.ge(0)
    hidden = hidden_states(model, batch)
    hidden.retain_grad()
    loss = prm_loss(head_logits(model, hidden[where], tag_ids(processor)[1:]), targets[where])
    loss.backward()
    touched = hidden.grad.abs().sum(-1).gt(0)
    assert torch.equal(touched, where)
    model.zero_grad()


def test_soft_targets_stay_soft():
    logits = torch.zeros(1, 2, requires_grad=True)
    prm_loss(logits, torch.tensor([0.3])).backward()
    assert logits.grad[0, 0].item() == pytest.approx(0.5 - 0.3)  # d/dz of BCE = p - target
    best = torch.tensor([[math.log(0.3 / 0.7), 0.0]], requires_grad=True)
    prm_loss(best, torch.tensor([0.3])).backward()
    assert best.grad.abs().max().item() < 1e-6


def test_score_shapes_for_complete_and_partial_chains(llava, train_records):
    model, processor = llava
    prm = PRM(model, processor, batch_size=2)
    rows = _rows(train_records, 3)
    partial = rows[0]["response"].split(STEP_END)[0] + STEP_END
    scores = prm.score(rows + rows[:1], [r["response"] for r in rows] + [partial])
    for row, s in zip(rows, scores):
        assert len(s.steps) == len(parse(row["response"]).steps) and 0 < s.answer < 1
    assert len(scores[-1].steps) == 1 and scores[-1].answer is None
    assert scores[-1].steps[0] == pytest.approx(scores[0].steps[0], abs=1e-5)  # causal: same prefix
    assert prm.chains_scored == 4 and prm.forward_passes == 2


def test_auroc_and_ranking():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
    assert auroc([0.1, 0.2], [1, 1]) is None
    by_q = {"a": [(0.9, 1), (0.2, 0), (0.5, 0)], "b": [(0.3, 1), (0.6, 0)], "c": [(0.4, 1)]}
    assert ranking_auroc(by_q) == pytest.approx(2 / 3) and ranking_pairs(by_q) == 3


def test_merge_agree_masks_disagreements():
    base = {"image": "x", "question": "q", "response": "r", "question_id": "q1"}
    rows = [{**base, "id": "s/mc", "sample_id": "s", "source": "mc", "labels": [1, 0, 1],
             "values": [1, 0, 1]},
            {**base, "id": "s/judge", "sample_id": "s", "source": "judge", "labels": [1, 1, 1]},
            {**base, "id": "t/judge", "sample_id": "t", "source": "judge", "labels": [0, 1]},
            {**base, "id": "p/perturb", "sample_id": "p", "source": "perturb", "labels": [0, 1]}]
    assert merge_labels(rows, "union") == rows
    merged = merge_labels(rows, "agree")
    assert [r["labels"] for r in merged] == [[1, None, 1], [0, 1]]


def _label_file(path, records, verdicts=((1, "a"), (0, "b"))):
    """Teacher chains labelled all good or all bad, one row per (record, verdict)."""
    teacher = ProgrammaticTeacher()
    with JsonlWriter(path) as writer:
        for record in records:
            text = teacher.explain(record)
            for good, suffix in verdicts:
                writer.write({**record, "id": f"{record['id']}{suffix}/judge",
                              "sample_id": record["id"] + suffix, "question_id": record["id"],
                              "source": "judge", "response": text,
                              "labels": [good] * (len(parse(text).steps) + 1)})
    return path


def test_training_lowers_loss_and_evaluation_reports(tiny_model_dir, train_records, tmp_path):
    path = _label_file(tmp_path / "labels.jsonl", train_records[:16])
    cfg = PRMConfig(max_steps=6, per_device_train_batch_size=8, learning_rate=5e-3, save_steps=100,
                    warmup_steps=0, aggregate="min", step_weight=0.5)
    out = train_prm(tiny_model_dir("llava"), path, tmp_path / "prm", cfg)
    import json

    meta = json.loads((out / "chainstep.json").read_text())
    assert meta["role"] == "prm" and meta["labelled_chains"] == 32 and meta["malformed_chains"] == 0
    assert meta["chains"] == 16  # the likelihood head with no BCE learns from the right chains alone
    prm = PRM.from_dir(out)  # scores as it was trained to
    assert (prm.scoring.step_weight, prm.scoring.aggregate, prm.scoring.source) == (0.5, "min", "verifier")
    assert PRM.from_dir(out, step_weight=0.1).scoring.source == "override"
    rows = read_jsonl(path)
    metrics = evaluate_prm(prm, rows)
    scores, passes = prm.score(rows, [r["response"] for r in rows]), prm.forward_passes
    assert evaluate_prm(prm, rows, scores) == metrics and prm.forward_passes == passes  # none recomputed
    assert metrics["steps"] == sum(len(parse(r["response"]).steps) for r in read_jsonl(path))
    assert metrics["majority_baseline"] == pytest.approx(0.5)
    assert metrics["ranking_auroc"] == pytest.approx(0.5)  # identical chains tie
    assert metrics["ranking_pairs_parsed"] == metrics["ranking_pairs"] == 16  # teacher chains parse
    families = {r["meta"]["family"] for r in read_jsonl(path)}
    assert set(metrics["per_family_ranking_auroc"]) == families


def test_lora_prm_trains_and_merges(tiny_model_dir, train_records, tmp_path):
    path = _label_file(tmp_path / "labels.jsonl", train_records[:8], verdicts=((1, ""),))
    cfg = PRMConfig(max_steps=2, per_device_train_batch_size=4, lora=True, learning_rate=1e-2,
                    save_steps=100)
    out = train_prm(tiny_model_dir("llava"), path, tmp_path / "prm", cfg)
    assert not (out / "adapter_config.json").exists()
    before, _ = models.load(tiny_model_dir("llava"))
    after, _ = models.load(out)
    changed = {n for (n, a), (_, b) in zip(before.named_parameters(), after.named_parameters())
               if not torch.equal(a, b)}
    assert changed and all("language_model" in n for n in changed)


@pytest.mark.parametrize("arch,head", [("llava", "tag"), ("qwen2_vl", "tag"), ("llava", "likelihood")])
def test_scoring_continuations_on_a_shared_prefix_equals_scoring_them_whole(tiny_model_dir, train_records,
                                                                             arch, head):
    model, processor = models.load(tiny_model_dir(arch))
    prm = PRM(model, processor, batch_size=4, head=head)
    texts = [ProgrammaticTeacher().explain(r) for r in train_records[:3]]
    prefixes = ["", texts[1].split(STEP_END)[0] + STEP_END,
                STEP_END.join(texts[2].split(STEP_END)[:3]) + STEP_END]
    groups = [[t[len(p):], t[len(p):len(p) + 40]] for p, t in zip(prefixes, texts)]
    records = [r for r in train_records[:3] for _ in range(2)]
    joined = [p + c for p, g in zip(prefixes, groups) for c in g]
    passes = []
    for verifier in (prm, CheckedVerifier(prm)):  # the checks keep the shared prefill
        before = prm.forward_passes
        shared = verifier.score_continuations(train_records[:3], prefixes, groups)
        passes.append(prm.forward_passes - before)
        for got, want in zip([s for g in shared for s in g], verifier.score(records, joined)):
            assert got.steps == pytest.approx(want.steps, abs=1e-4)
            assert (got.answer is None) == (want.answer is None)
            if want.answer is not None:
                assert got.answer == pytest.approx(want.answer, abs=1e-4)
    assert passes[1] == passes[0]  # the PRM's own path (llava: 4, two per chunk of two prefixes; joined: 2)


def test_samples_of_a_question_share_its_prompt_are_scored_once_each_and_keep_their_order(
        tiny_model_dir, train_records):
    model, processor = models.load(tiny_model_dir("llava"))
    prm = PRM(model, processor, batch_size=8, head="likelihood")
    texts = [ProgrammaticTeacher().explain(r) for r in train_records[:3]]
    samples = [[texts[0], texts[0][:60], texts[0]], [texts[1], texts[2]], [texts[2]]]
    flat = score_samples(prm, train_records[:3], samples)
    assert prm.forward_passes == 2  # one prefill of the three prompts, one pass over their samples
    assert prm.chains_scored == 5  # the repeated sample is scored once
    records = [r for r, g in zip(train_records[:3], samples) for _ in g]
    whole = prm.score(records, [t for g in samples for t in g])
    assert len(flat) == len(whole) == 6
    assert flat[2] == flat[0]
    for got, want in zip(flat, whole):
        assert got.steps == pytest.approx(want.steps, abs=1e-4)
        assert (got.answer is None) == (want.answer is None)


def test_batches_fill_a_budget_and_give_an_oversized_item_its_own():
    assert batches([2, 2, 2], 4) == [slice(0, 2), slice(2, 3)]
    assert batches([5, 1, 3], 4) == [slice(0, 1), slice(1, 3)]
    assert batches([], 4) == []


def test_training_leaves_out_chains_whose_labels_miss_their_tags(tiny_model_dir, train_records, tmp_path):
    import json

    path = _label_file(tmp_path / "labels.jsonl", train_records[:2])
    bad = {**read_jsonl(path)[0], "id": "bad/judge", "labels": [1, 0]}
    with JsonlWriter(path) as writer:
        writer.write(bad)
    cfg = PRMConfig(max_steps=1, per_device_train_batch_size=8, save_steps=100, warmup_steps=0)
    out = train_prm(tiny_model_dir("llava"), path, tmp_path / "prm", cfg)
    meta = json.loads((out / "chainstep.json").read_text())
    assert (meta["labelled_chains"], meta["chains"], meta["malformed_chains"]) == (4, 2, 1)


def test_likelihood_head_reads_the_least_likely_token_of_each_thought_and_answer(llava, train_records):
    model, processor = llava
    row = _rows(train_records, 1)[0]
    batch = collate([encode_prm_example(processor, row, row["response"])], processor.tokenizer.pad_token_id)
    tags = batch.pop("prm_targets")[0].ge(0).nonzero().flatten().tolist()
    ids = batch["input_ids"][0].tolist()
    with torch.no_grad():
        logprobs = model(**batch).logits[0].float().log_softmax(-1)
    scores = PRM(model, processor, head="likelihood").score([row], [row["response"]])[0]
    tok = processor.tokenizer
    starts, ends = tok.convert_tokens_to_ids([THOUGHT_START, ANSWER_START]), \
        tok.convert_tokens_to_ids([THOUGHT_END, ANSWER_END])
    for tag, p in zip(tags, scores.steps + [scores.answer]):
        span = judged_span(ids, tag, marker_ids(processor))
        assert ids[span.start - 1] in starts and ids[span.stop - 1] in ends and span.stop <= tag
        least = min(logprobs[j - 1, ids[j]].item() for j in span)
        assert p == pytest.approx(1 / (1 + math.exp(-(least + LIKELIHOOD_OFFSET))), abs=1e-4)


def test_likelihood_training_targets_stop_at_the_first_error(llava, train_records):
    from chainstep.prm_train import _Collator

    model, processor = llava
    right, wrong = _rows(train_records, 2)
    steps = len(parse(wrong["response"]).steps)
    rows = [{**right, "labels": [1] * (len(parse(right["response"]).steps) + 1)},
            {**wrong, "labels": [1, 0] + [0] * (steps - 1)}]
    batch = _Collator(processor, soft=False, lm=True)(rows)
    targets = batch["prm_targets"][1][batch["prm_targets"][1].ne(-100)].tolist()
    assert targets == [1.0, 0.0]  # the tags after the first bad one are left out
    labels = batch["labels"]
    assert labels[1].eq(-100).all()  # no next-token loss on a wrong chain
    response = labels[0].ne(-100)
    assert response.sum() > 0 and not (response & batch["prm_targets"][0].ne(-100)).any()  # tags excluded
    assert torch.equal(labels[0][response], batch["input_ids"][0][response])


@pytest.mark.parametrize("label_weight,gain", [(1.0, 0.15), (0.0, 0.01)])
def test_likelihood_prm_training_makes_right_chains_likelier(tiny_model_dir, train_records, tmp_path,
                                                             label_weight, gain):
    import json

    path = _label_file(tmp_path / "labels.jsonl", train_records[:16], verdicts=((1, ""),))
    rows = read_jsonl(path)
    texts = [r["response"] for r in rows]
    before = PRM.from_dir(tiny_model_dir("llava"), head="likelihood").score(rows, texts)
    cfg = PRMConfig(head="likelihood", max_steps=8, per_device_train_batch_size=8, learning_rate=5e-3,
                    save_steps=100, warmup_steps=0, bf16=False, label_weight=label_weight)
    out = train_prm(tiny_model_dir("llava"), path, tmp_path / "prm", cfg)
    assert json.loads((out / "chainstep.json").read_text())["prm"]["head"] == "likelihood"
    prm = PRM.from_dir(out)
    assert prm.head == "likelihood"
    after = prm.score(rows, texts)
    mean = lambda scores: sum(sum(s.steps) + s.answer for s in scores) / len(scores)  # noqa: E731
    assert mean(after) > mean(before) + gain


def test_chains_that_carry_no_gradient_are_left_out_and_none_left_is_a_clear_error(
        tiny_model_dir, train_records, tmp_path):
    right = {"labels": [1, 1, 1]}
    wrong = {"labels": [1, 0, 0]}
    assert carries_gradient(right, True, 0.0) and not carries_gradient(wrong, True, 0.0)
    assert carries_gradient(wrong, True, 0.5) and carries_gradient(wrong, False, 0.0)
    path = _label_file(tmp_path / "labels.jsonl", train_records[:2], verdicts=((0, "b"),))
    with pytest.raises(ChainstepError, match="no chains to train on.*label_weight=0.0"):
        train_prm(tiny_model_dir("llava"), path, tmp_path / "prm", PRMConfig(max_steps=1))


def test_prm_config_names_a_bad_head_or_label_weight():
    with pytest.raises(ChainstepError, match="prm.head"):
        PRMConfig(head="logits")
    with pytest.raises(ChainstepError, match="prm.label_weight"):
        PRMConfig(label_weight=-1.0)
