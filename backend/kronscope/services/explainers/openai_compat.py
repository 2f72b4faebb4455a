"""An explainer that asks any OpenAI-compatible chat endpoint (``POST .../v1/chat/completions``).

The endpoint, model, key and timeout come from Settings only (``llm_url``, ``llm_model``,
``llm_api_key``, ``llm_timeout_s``, ``llm_max_retries``), never from a request, so an API
caller cannot point the server anywhere. Timeouts, connection errors and 5xx answers are
retried ``llm_max_retries`` times with a short back-off; then, like 4xx answers and
answers that are not a chat completion (not JSON, no ``choices[0].message.content``,
empty, or not one short line of text), they raise ``ExplainerError`` with the reason, and
the job fails without writing anything.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any
from urllib.parse import urlsplit

import httpx

from ...config import Settings
from . import Evidence, ExplainerError, Snippet

MAX_ANSWER_CHARS = 400
MAX_EXAMPLE_TOKENS = 48
SYSTEM_PROMPT = (
    "You explain features of a sparse autoencoder trained on a language model's activations. "
    "You see text examples where the feature is active; the token where it is strongest is "
    "marked <<like this>>. Answer with one short phrase (at most 25 words) saying when the "
    "feature fires. No preamble, no quotes, no lists."
)
_PREFIX = re.compile(r"^(explanation|answer|feature|description)\s*:\s*", re.IGNORECASE)


def chat_url(base: str) -> str:
    """``http://host/v1`` or ``http://host`` -> ``.../v1/chat/completions`` (kept as given
    when it already ends so)."""
    url = base.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


def _where(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc.rsplit("@", 1)[-1] or url  # never show credentials in messages


def _window(s: Snippet) -> str:
    lo = max(0, s.position - MAX_EXAMPLE_TOKENS + 8)
    hi = min(len(s.tokens), lo + MAX_EXAMPLE_TOKENS)
    out = []
    for p in range(lo, hi):
        tok = s.tokens[p]
        out.append(f"<<{tok}>>" if p == s.position else tok)
    return "".join(out).replace("\n", "\\n")


def build_messages(ev: Evidence, max_examples: int) -> list[dict[str, str]]:
    lines = [f"Feature: {ev.label} of SAE {ev.sae}.", "", "Top activating examples:"]
    for n, s in enumerate(ev.top[:max_examples], 1):
        lines.append(f"{n}. {_window(s)}  (activation {s.value:.3g})")
    if ev.samples:
        lines += ["", "Examples at lower activations:"]
        for n, s in enumerate(ev.samples[:max_examples], 1):
            lines.append(f"{n}. {_window(s)}  (activation {s.value:.3g})")
    if ev.has_parents:
        lines += [
            "",
            "This feature is the AND of two parent features: it fires only where both fire.",
            f"{ev.base_label}: {ev.base_text or 'no explanation yet'}",
            f"{ev.extension_label}: {ev.extension_text or 'no explanation yet'}",
            "Say what the combination selects.",
        ]
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "\n".join(lines)},
    ]


def parse_answer(payload: Any) -> str:
    """The text of a chat completion, cleaned; ``ExplainerError`` when it is unusable."""
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ExplainerError(
            "the answer is not a chat completion (no choices[0].message.content)"
        ) from None
    if not isinstance(content, str):
        raise ExplainerError("the answer's message content is not text")
    text = content.replace("\x00", "").strip()
    text = text.splitlines()[0].strip() if text else ""
    text = _PREFIX.sub("", text).strip().strip("\"'`").strip()
    text = " ".join(text.split())
    if not text:
        raise ExplainerError("the answer is empty")
    if len(text) > MAX_ANSWER_CHARS:
        raise ExplainerError(f"the answer is {len(text)} characters long, not a short explanation")
    if not any(c.isalnum() for c in text):
        raise ExplainerError(f"the answer has no words: {text[:60]!r}")
    return text


class OpenAICompatExplainer:
    """Sequential requests through one ``httpx.Client`` (close it when done)."""

    def __init__(self, settings: Settings, *, client: httpx.Client | None = None):
        if not settings.llm_url or not settings.llm_model:
            raise ExplainerError(
                "no LLM endpoint is configured (set KRONSCOPE_LLM_URL and KRONSCOPE_LLM_MODEL)"
            )
        self.url = chat_url(settings.llm_url)
        self.model = settings.llm_model
        self.source = f"llm:{settings.llm_model}"
        self.timeout = settings.llm_timeout_s
        self.retries = settings.llm_max_retries
        self.max_examples = settings.explain_examples
        headers = {"Content-Type": "application/json"}
        if settings.llm_api_key:
            headers["Authorization"] = f"Bearer {settings.llm_api_key}"
        self.client = client or httpx.Client(
            timeout=self.timeout, headers=headers, follow_redirects=False
        )

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> OpenAICompatExplainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def explain(self, evidence: Evidence) -> str | None:
        if not evidence.top and not evidence.samples:
            return None
        body = {
            "model": self.model,
            "messages": build_messages(evidence, self.max_examples),
            "temperature": 0.0,
            "max_tokens": 120,
        }
        return parse_answer(self._post(body))

    def _post(self, body: dict[str, Any]) -> Any:
        where = _where(self.url)
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 5.0))
            try:
                response = self.client.post(self.url, json=body, timeout=self.timeout)
            except httpx.TimeoutException:
                last = f"the LLM endpoint at {where} did not answer within {self.timeout:g} s"
                continue
            except httpx.HTTPError as exc:
                last = (
                    f"the LLM endpoint at {where} cannot be reached ({type(exc).__name__}: {exc})"
                )
                continue
            if response.status_code >= 500:
                last = f"the LLM endpoint at {where} answered HTTP {response.status_code}: {_snippet(response)}"
                continue
            if response.status_code >= 400:
                raise ExplainerError(
                    f"the LLM endpoint at {where} answered HTTP {response.status_code}: {_snippet(response)}"
                )
            try:
                return response.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ExplainerError(
                    f"the LLM endpoint at {where} answered something that is not JSON: {_snippet(response)}"
                ) from None
        raise ExplainerError(last + (f" (tried {self.retries + 1} times)" if self.retries else ""))


def _snippet(response: httpx.Response) -> str:
    text = response.content[:200].decode("utf-8", "replace").replace("\n", " ").strip()
    return repr(text) if text else "(empty body)"
