import pytest

from chainstep.prm import PRM
from chainstep.sampling import Policy
from chainstep.scoring import ChainScore
from chainstep.search import (
    SearchConfig,
    beam_search,
    best_of_n,
    choose_temperature,
    majority_vote,
    select,
    weighted_vote,
    well_formed,
)
from chainstep.steps import ANSWER_END, STEP_END, Chain, Step, render


def row(answer, correct=False, parsed=True, tokens=10, i=0):
    return {"id": f"q#{i}", "question_id": "q", "predicted": answer, "parsed": parsed,
            "correct": correct, "tokens": tokens, "family": "f", "steps": 3}


def test_majority_vote_normalises_answers_and_skips_unparsed():
    rows = [row("B", i=0), row("(a)", i=1), row("A.", i=2), row(None, parsed=False, i=3), row("B", i=4)]
    assert majority_vote(rows)["id"] == "q#0"  # tie 2-2: the first row with a top answer
    rows.append(row("a", i=5))
    assert majority_vote(rows)["predicted"] == "(a)"
    assert majority_vote([row(None, parsed=False)])["id"] == "q#0"


def test_best_of_n_and_weighted_vote():
    rows = [row("3", i=0), row("4", i=1), row("4", i=2)]
    scores = [0.9, 0.5, 0.6]
    assert best_of_n(rows, scores)["id"] == "q#0"
    assert weighted_vote(rows, scores)["id"] == "q#2"  # 0.5 + 0.6 > 0.9


def test_best_of_n_ranks_only_chains_that_parse():
    rows = [row("3", parsed=False, i=0), row("4", i=1), row("5", i=2)]
    assert best_of_n(rows, [0.9, 0.5, 0.6])["id"] == "q#2"
    assert best_of_n(rows[:1], [0.1])["id"] == "q#0"  # nothing parses: the best-scored


def test_well_formed_checks_partial_and_finished_chains():
    text = render(Chain((Step("Count", "Red shapes: 3", "Checked."), Step("Add", "3 + 1 = 4", "Ok.")), "4"))
    first_step = text[:text.index(STEP_END) + len(STEP_END)]
    assert well_formed(text, done=True) and well_formed(first_step, done=False)
    broken = first_step.replace("Red shapes: 3", "Red shapes: " + STEP_END)
    assert not well_formed(broken, done=False)
    assert not well_formed(text.replace("\nAnswer:", ""), done=True)


def test_select_counts_the_compute_of_all_n():
    rows = [row("3", tokens=5, i=0), row("4", correct=True, tokens=7, i=1)]
    picked = select("pass", rows)
    assert picked["correct"] and picked["id"] == "q" and picked["tokens"] == 12
    assert select("bon", rows, [0.1, 0.2])["prm_chains"] == 2
    assert select("sc", rows)["prm_chains"] == 0


@pytest.fixture(scope="module")
def searchers(sft_model_dir):
    return Policy.from_dir(sft_model_dir), PRM.from_dir(sft_model_dir)


def test_beam_search_extends_one_step_at_a_time(searchers, test_records):
    policy, prm = searchers
    seen = []
    original = policy.generate

    def spy(records, params=None, prefixes=None, progress=True):
        out = original(records, params, prefixes, progress)
        seen.append((prefixes, out, params))
        return out

    policy.generate = spy
    try:
        rows, compute = beam_search(policy, prm, test_records[:3], n=4, keep=1, step_tokens=64, max_steps=6)
    finally:
        policy.generate = original
    for prefixes, out, params in seen:
        assert params.n == 4
        for prefix, group in zip(prefixes, out):
            assert prefix == "" or prefix.endswith(STEP_END)  # beams continue from step boundaries
            for gen in group:
                if gen.finish_reason == "step":
                    assert gen.text.endswith(STEP_END) and gen.text.count(STEP_END) == 1
    assert len(rows) == 3
    assert compute["tokens_generated"] == sum(r["tokens"] for r in rows)
    assert compute["prm_chains"] == sum(r["prm_chains"] for r in rows)
    assert compute["prm_chains"] == sum(len(p) * 4 for p, _, _ in seen)
    assert compute["prm_forward_passes"] >= len(seen)
    assert 0 < compute["verifier_s"] <= compute["wall_s"]
    for r in rows:
        assert r["response"] == "" or ANSWER_END in r["response"] or not r["parsed"]


class ScriptedPolicy:
    """Candidate j of every beam is step `depth` of a fixed chain, its thought naming j."""

    def __init__(self, steps: int = 2):
        full = render(Chain(tuple(Step(f"S{d}", "T", "R") for d in range(steps)), "1"))
        cut = [i + len(STEP_END) for i in range(len(full)) if full.startswith(STEP_END, i)]
        self.pieces = [full[a:b] for a, b in zip([0, *cut], [*cut, len(full)])]
        self.calls = []

    def generate(self, records, params, prefixes=None, progress=True):
        from chainstep.sampling import Generation

        self.calls.append([(r["id"], p) for r, p in zip(records, prefixes)])
        out = []
        for prefix in prefixes:
            depth = prefix.count(STEP_END)
            piece = self.pieces[depth]
            done = depth == len(self.pieces) - 1
            out.append([Generation(piece.replace("T<", f"T{j}<"), 5, "stop" if done else "step")
                        for j in range(params.n)])
        return out


class ScriptedPRM:
    """Scores a candidate by the j its thought names, with a per-question twist, so the best
    candidate differs between questions."""

    scoring, forward_passes = ChainScore(), 0

    def score_continuations(self, records, prefixes, continuations):
        from chainstep.scoring import StepScores

        self.forward_passes += 1
        return [[StepScores([self.value(r, c)], self.value(r, c) if ANSWER_END in c else None) for c in group]
                for r, group in zip(records, continuations)]

    @staticmethod
    def value(record, text) -> float:
        j = int(text.split("T", 1)[1][0]) if "T" in text and text.split("T", 1)[1][0].isdigit() else 0
        return ((j + len(record["id"])) % 4) / 4


@pytest.mark.parametrize("keep", [1, 2])
def test_beam_search_keeps_the_top_scored_candidates_one_call_per_depth(test_records, keep):
    records = test_records[:3]
    policy, prm = ScriptedPolicy(), ScriptedPRM()
    rows, compute = beam_search(policy, prm, records, n=4 * keep, keep=keep, max_steps=6)
    assert len(policy.calls) == len(policy.pieces)  # one generate call per depth for every question
    for depth, call in enumerate(policy.calls):
        beams = {}
        for qid, prefix in call:
            beams.setdefault(qid, []).append(prefix)
        assert set(beams) == {r["id"] for r in records}
        assert all(len(b) == (1 if depth == 0 else keep) for b in beams.values())
        if depth == 1:  # the survivors of the first step are its top-scored candidates
            for record in records:
                ranked = sorted(range(4), key=lambda j: ScriptedPRM.value(record, f"T{j}"), reverse=True)
                kept = sorted(int(p.rsplit("T", 1)[1][0]) for p in beams[record["id"]])
                assert kept == sorted(ranked[:keep])
    assert compute["prm_chains"] == sum(len(call) * 4 for call in policy.calls)
    assert all(r["parsed"] for r in rows)


def test_beam_search_keeps_k_beams(searchers, test_records):
    policy, prm = searchers
    rows, compute = beam_search(policy, prm, test_records[:2], n=4, keep=2, step_tokens=64, max_steps=4)
    assert len(rows) == 2 and compute["prm_chains"] > 0


def test_sampled_strategies_score_with_the_task_records(searchers, test_records, tmp_path):
    from chainstep.search import evaluate_search, search_predictions

    policy, prm = searchers
    records = test_records[:3]
    preds, compute = search_predictions("bon", policy, records, 2, tmp_path, "m", "test", prm,
                                        max_tokens=160)
    assert [p["id"] for p in preds] == [r["id"] for r in records]
    assert compute["prm_chains"] == 6 and compute["tokens_generated"] == sum(p["tokens"] for p in preds)
    cfg = SearchConfig(ns=(1, 2), beam_ns=(2,), step_weights=(0.0, 1.0), step_tokens=48, max_steps=5)
    results, ablation, final = evaluate_search(policy, prm, records, cfg, tmp_path, 0.7, "m", "test", 160)
    controls = {f"{s}[{c}]" for s in ("bon", "weighted") for c in ("checks", "judge")}
    assert {(r["strategy"], r["n"]) for r in results} == {
        (s, n) for s in ("pass", "sc", "bon", "weighted") for n in (1, 2)} | {("beam", 2)} | {
        (c, 2) for c in controls}
    assert [a["step_weight"] for a in ablation] == [0.0, 1.0]
    assert set(final) == {"pass", "sc", "bon", "weighted", "beam"} | controls
    scored = {(r["strategy"], r["n"]) for r in results if "verifier_s" in r}
    assert scored == {(s, n) for s in ("bon", "weighted", "beam") for n in (1, 2) if (s, n) != ("beam", 1)}
    pass_at = {r["n"]: r["accuracy"] for r in results if r["strategy"] == "pass"}
    assert pass_at[2] >= pass_at[1]
    # the oracle picks a right chain wherever one is right in every step
    for oracle, right_somewhere in zip(final["bon[judge]"], final["pass"]):
        assert oracle["correct"] or not right_somewhere["steps_right"]


def test_controls_rank_the_same_samples_and_reuse_the_learned_scores(test_records):
    from chainstep.scoring import StepScores
    from chainstep.search import verifier_controls
    from chainstep.steps import render
    from chainstep.teacher import ProgrammaticTeacher

    records = test_records[:2]
    teacher = ProgrammaticTeacher()
    texts = [render(teacher.chain(r)) for r in records]
    broken = [t.replace("<|answer_end|>", "") for t in texts]  # cut before the answer ends
    by_q = {r["id"]: ([{"response": t}, {"response": b}], None) for r, t, b in zip(records, texts, broken)}
    learned = [StepScores([0.3], 0.4)] * 4
    out = verifier_controls(records, by_q, 2, learned)
    assert set(out) == {"checks", "judge", "learned"}
    assert out["learned"][records[0]["id"]] == [StepScores([0.3], 0.4)] * 2
    for name in ("checks", "judge"):
        right, cut = out[name][records[0]["id"]]
        assert cut.answer == 0.0 and right.answer > 0.0, name


def test_the_temperature_sweep_picks_on_val_and_records_every_temperature(tmp_path, monkeypatch):
    """Scripted val samples: at 0.5 half the chains are right and the PRM finds them; at the
    other temperatures none is. The sweep must pick 0.5 and keep a row for each."""
    from chainstep.scoring import StepScores

    right_at = {0.2: 0.0, 0.5: 0.5, 0.9: 0.0}
    seen = []

    def sample_and_score(policy, prm, records, path, n, temperature, max_tokens, seed, extractor=None):
        seen.append((temperature, path.name))
        by_q = {}
        for r in records:
            rows = [row("4" if j < right_at[temperature] * n else "5", correct=j < right_at[temperature] * n,
                        i=j) for j in range(n)]
            scores = [StepScores([0.5], 0.9 if x["correct"] else 0.1) for x in rows]
            by_q[r["id"]] = (rows, scores)
        return by_q, 0.0, 0.0, None

    monkeypatch.setattr("chainstep.search._sample_and_score", sample_and_score)

    class Verifier:
        scoring = ChainScore()

    records = [{"id": f"v{i}"} for i in range(3)]
    cfg = SearchConfig(ns=(1, 4), temperatures=(0.2, 0.5, 0.9))
    chosen, sweep = choose_temperature(None, Verifier(), records, cfg, tmp_path, max_tokens=8)
    assert chosen == 0.5
    assert [r["temperature"] for r in sweep] == [0.2, 0.5, 0.9]
    assert [r["bon"] for r in sweep] == [0.0, 1.0, 0.0] and sweep[1]["sample"] == 0.5
    assert [name for _, name in seen] == ["val-samples-t0.2.jsonl", "val-samples-t0.5.jsonl",
                                          "val-samples-t0.9.jsonl"]
    one, rows = choose_temperature(None, Verifier(), records, SearchConfig(temperatures=(0.9,)), tmp_path, 8)
    assert one == 0.9 and len(rows) == 1  # a single temperature is still measured and recorded
