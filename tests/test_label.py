
from chainstep.evaluate import sample_responses
from chainstep.judge import ProgrammaticJudge
from chainstep.label import LabelConfig, judge_labels, label, mc_labels, monte_carlo, step_prefixes
from chainstep.records import read_jsonl
from chainstep.sampling import Generation, Policy, SamplingParams
from chainstep.steps import STEP_END, parse
from chainstep.teacher import ProgrammaticTeacher


def test_mc_rules_on_hand_made_rollouts():
    values = [1.0, 0.25, 0.0, 0.5]
    assert mc_labels(values, "hard") == [1, 1, 0, 1]
    assert mc_labels(values, "soft", threshold=0.5) == [1, 0, 0, 1]
    assert mc_labels(values, "soft", threshold=0.3) == [1, 0, 0, 1]


def test_neutral_mapping():
    ratings = ["good", "neutral", "bad"]
    assert judge_labels(ratings, "bad") == [1, 0, 0]
    assert judge_labels(ratings, "good") == [1, 1, 0]
    assert judge_labels(ratings, "drop") == [1, None, 0]


def test_step_prefixes_end_at_each_step(train_records):
    text = ProgrammaticTeacher().explain(train_records[0])
    prefixes = step_prefixes(text)
    assert len(prefixes) == len(parse(text).steps)
    assert all(p.endswith(STEP_END) and text.startswith(p) for p in prefixes)
    assert [p.count(STEP_END) for p in prefixes] == list(range(1, len(prefixes) + 1))


def test_monte_carlo_values_are_rollout_fractions(sft_model_dir, train_records):
    policy = Policy.from_dir(sft_model_dir)
    texts = [ProgrammaticTeacher().explain(r) for r in train_records[:3]]
    values = monte_carlo(policy, list(zip(train_records[:3], texts)), k=4,
                         params=SamplingParams(temperature=1.0, max_tokens=64, seed=0))
    for text, vals in zip(texts, values):
        assert len(vals) == len(parse(text).steps)
        assert all(v in (0.0, 0.25, 0.5, 0.75, 1.0) for v in vals)


def test_a_rollout_counts_only_when_the_whole_chain_parses(train_records):
    """An answer span in a continuation that breaks the grammar was counted right; evaluation
    scores such a chain wrong, and rollouts now use the same rule."""
    record = train_records[0]
    text = ProgrammaticTeacher().explain(record)
    prefix = step_prefixes(text)[0]

    class Scripted:
        def generate(self, records, params, prefixes=None, progress=True):
            good = text[len(prefix):]
            broken = "garbage<|answer_start|>" + record["answer"] + "<|answer_end|>"
            return [[Generation(good, 1, "stop"), Generation(broken, 1, "stop")] for _ in records]

    values = monte_carlo(Scripted(), [(record, text)], k=2, params=SamplingParams(temperature=1.0))
    assert values[0] == [0.5] * len(step_prefixes(text))


def test_label_writes_every_source_once_and_resumes(sft_model_dir, train_records, tmp_path):
    policy = Policy.from_dir(sft_model_dir)
    records = train_records[:4]
    samples = sample_responses(policy, records, tmp_path / "samples.jsonl",
                               SamplingParams(n=2, temperature=1.0, max_tokens=160, seed=0))
    rows = [r for group in samples.values() for r in group]
    # a teacher chain stands in for a parseable sample, so every source has work
    rows[0] = {**rows[0], "response": ProgrammaticTeacher().explain(records[0]), "parsed": True,
               "correct": True}
    cfg = LabelConfig(rollouts=2, max_tokens=64, perturbed=1)
    out = tmp_path / "labels.jsonl"
    first = label(rows, records, out, cfg, policy)
    again = label(rows, records, out, cfg, policy)
    written = read_jsonl(out)
    assert len({r["id"] for r in written}) == len(written)
    assert first["perturb"] == 8 and "perturb" not in again and "mc" not in again
    assert first["mc"] >= 1 and first["judge"] >= 1
    lines = out.read_text().splitlines(True)  # a kill that cut the MC rows: redrawn the same
    last_mc = max(i for i, line in enumerate(lines) if '/mc"' in line)
    out.write_text("".join(lines[:last_mc] + lines[last_mc + 1:]))
    label(rows, records, out, cfg, Policy.from_dir(sft_model_dir))
    assert sorted(out.read_text().splitlines()) == sorted(line.rstrip("\n") for line in lines)
    for row in written:  # one label per tag: after every step end and the answer end
        tags = row["response"].count(STEP_END) + row["response"].count("<|answer_end|>")
        assert len(row["labels"]) == tags
        if row["source"] == "mc":
            assert len(row["values"]) == tags


def test_malformed_chains_are_labelled_bad_from_the_break_on(train_records):
    from chainstep.label import judged_labels

    record = train_records[0]
    text = ProgrammaticTeacher().explain(record)
    broken = text.replace("<|reasoning_step_thought_end|>", "", 2)  # breaks steps 1 and 2
    labels, ratings = judged_labels(record, broken, ProgrammaticJudge(), "bad")
    steps = len(parse(text).steps)
    assert len(labels) == steps + 1 and labels == [0] * (steps + 1)
    late = text.replace("<|reasoning_proceed|>\n", "", 1)  # the format breaks at step 2
    labels, ratings = judged_labels(record, late, ProgrammaticJudge(), "bad")
    assert labels == [1] + [0] * steps
    assert ratings == ["good"] + ["malformed"] * (steps - 1)
    good, _ = judged_labels(record, text, ProgrammaticJudge(), "bad")
    assert good == [1] * (steps + 1)
