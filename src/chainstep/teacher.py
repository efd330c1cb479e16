"""Teachers write step chains for "reasoning from outcome": given the image, the question and
the ground-truth answer, explain how to get there in the step format.

A teacher is anything with `explain(record) -> str` returning raw text; `construct` parses and
filters it. The programmatic teacher reads the per-step facts the synthetic suite keeps in
`meta`; a remote model behind an OpenAI-compatible endpoint plugs into the same protocol.
"""

from __future__ import annotations

import json
import random
import re
import threading
from pathlib import Path
from typing import Protocol

from .errors import ChainstepError
from .records import load_image, prompt_text
from .steps import REASONING_START, Chain, Step, render

THOUGHTS = ("{key}: {value}", "{key}: {value}.", "From the image, {lkey}: {value}")
REFLECTIONS = {
    "read": ("This matches the image.", "Checked against the image.", "The image confirms this."),
    "arithmetic": ("The arithmetic is correct.", "Computed step by step.",
                   "Double-checked the calculation."),
    "option": ("This option matches the finding.", "The option letter agrees with the result."),
}


class Teacher(Protocol):
    def explain(self, record: dict) -> str:
        """Raw step-format text explaining how to reach `record['answer']`."""
        ...


def _step_kind(fact: dict) -> str:
    if "=" in fact["value"]:
        return "arithmetic"
    if "option" in fact["value"]:
        return "option"
    return "read"


class ProgrammaticTeacher:
    """Writes chains from the scene facts with varied wording, deterministic per record."""

    name = "programmatic"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def chain(self, record: dict) -> Chain:
        facts = record.get("meta", {}).get("steps")
        if not facts:
            raise ChainstepError(f"record {record['id']}: no step facts in meta; the programmatic "
                                 "teacher only serves the synthetic suite (use --teacher URL)")
        rng = random.Random(f"{self.seed}:{record['id']}")
        steps = []
        for fact in facts:
            kind = _step_kind(fact)
            templates = THOUGHTS if kind == "read" else THOUGHTS[:2]
            thought = rng.choice(templates).format(key=fact["key"], lkey=fact["key"].lower(),
                                                  value=fact["value"])
            steps.append(Step(fact["name"], thought, rng.choice(REFLECTIONS[kind])))
        return Chain(tuple(steps), record["answer"])

    def explain(self, record: dict) -> str:
        return render(self.chain(record))


TEMPLATE = Path(__file__).parent / "templates" / "teacher_prompt.txt"


def reply_to_chain_text(reply: str) -> str:
    """The step-format text in a teacher's reply: the marked-up chain itself, or a JSON object
    `{"steps": [{"name", "thought", "reflection"}], "answer"}` rendered into it (what general chat
    models write more reliably). Anything else is returned as is, for the filter to reject."""
    if REASONING_START in reply:
        return reply[reply.index(REASONING_START):].strip() + "\n"
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", reply.strip())
    try:
        data = json.loads(body)
        steps = tuple(Step(str(s["name"]), str(s["thought"]), str(s["reflection"])) for s in data["steps"])
        return render(Chain(steps, str(data["answer"])))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return reply


class HTTPTeacher:
    """Reasoning from outcome by any OpenAI-compatible chat model (GPT-4o, a vLLM server, or
    `chainstep serve`): the image as a data URL, the question and the ground-truth answer, with
    the prompt kept in a template file. Token usage is summed across threads."""

    name = "http"

    def __init__(self, client, template: str | Path = TEMPLATE):
        self.client = client
        self.template = Path(template).read_text(encoding="utf-8")
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}
        self._lock = threading.Lock()

    def prompt(self, record: dict) -> str:
        return self.template.format(question=prompt_text(record), answer=record["answer"])

    def explain(self, record: dict) -> str:
        from .client import user_message

        reply = self.client.complete([user_message(self.prompt(record), load_image(record))])
        with self._lock:
            self.usage["prompt_tokens"] += reply.prompt_tokens
            self.usage["completion_tokens"] += reply.completion_tokens
        return reply_to_chain_text(reply.text)
