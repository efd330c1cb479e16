"""The one HTTP client: chat completions against any OpenAI-compatible endpoint.

Used by the remote teacher, the remote judge and LLM answer extraction for benchmarks. The
official `openai` client does the transport work:
connection pooling, timeouts, and retries with exponential backoff and jitter on 408/409/429/5xx
and dropped connections, honouring `Retry-After`. A request that still fails raises
`RemoteError` with the reason, so callers can record it and move on.
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass

from PIL import Image

from .errors import ChainstepError


class RemoteError(ChainstepError):
    """A request that failed after all retries; `reason` is short enough for a rejects file."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class ChatReply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


def image_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def user_message(text: str, image: Image.Image | None = None) -> dict:
    """One user turn: the image first (as a data URL), then the text, as VLM servers expect."""
    parts = [{"type": "image_url", "image_url": {"url": image_data_url(image)}}] if image else []
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


class ChatClient:
    """`complete(messages)` against `base_url` (e.g. http://127.0.0.1:8000/v1) with `model`."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, max_retries: int = 5,
                 timeout: float = 60.0, max_tokens: int = 512, temperature: float = 0.0):
        from openai import OpenAI

        key = api_key or os.environ.get("OPENAI_API_KEY") or "none"
        self.client = OpenAI(base_url=base_url, api_key=key, max_retries=max_retries,
                             timeout=timeout)
        self.model, self.max_tokens, self.temperature = model, max_tokens, temperature

    def complete(self, messages: list[dict], **params) -> ChatReply:
        import openai

        params = {"max_tokens": self.max_tokens, "temperature": self.temperature, **params}
        try:
            out = self.client.chat.completions.create(model=self.model, messages=messages, **params)
        except openai.APIStatusError as err:
            raise RemoteError(f"http_{err.status_code}", str(err)[:200]) from err
        except openai.APITimeoutError as err:
            raise RemoteError("timeout", str(err)[:200]) from err
        except openai.APIConnectionError as err:
            raise RemoteError("connection", str(err)[:200]) from err
        except (openai.APIError, ValueError) as err:  # a reply that is not the JSON it should be
            raise RemoteError("bad_response", str(err)[:200]) from err
        if not out.choices or out.choices[0].message.content is None:
            raise RemoteError("empty_reply")
        usage = out.usage
        return ChatReply(out.choices[0].message.content,
                         usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0)
