"""An LLM judge the user configures: any OpenAI-compatible chat-completions endpoint and model.

Used by tasks whose metric is defined by an LLM grader (MM-Vet). Nothing here picks a judge by itself: with no
configuration the task reports that it did not score. Configure it in code (`OpenAICompatibleJudge(...)`) or
with environment variables, so `vtprune eval` needs no extra flags:

  VTPRUNE_JUDGE_BASE_URL   e.g. https://api.openai.com/v1 or http://localhost:8000/v1 (a vLLM server)
  VTPRUNE_JUDGE_MODEL      the judge model name, e.g. gpt-4-0613 (MM-Vet's paper grader)
  VTPRUNE_JUDGE_API_KEY    optional bearer token (falls back to OPENAI_API_KEY)
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass

from vtprune.eval.errors import EvalInputError

ENV_BASE_URL = "VTPRUNE_JUDGE_BASE_URL"
ENV_MODEL = "VTPRUNE_JUDGE_MODEL"
ENV_API_KEY = "VTPRUNE_JUDGE_API_KEY"


@dataclass
class OpenAICompatibleJudge:
    """POSTs `{"model", "messages", "temperature", "max_tokens"}` to `{base_url}/chat/completions`."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 60.0
    max_tokens: int = 16

    @classmethod
    def from_env(cls) -> OpenAICompatibleJudge | None:
        """The judge named by the environment, or None when none is configured (half a configuration is an
        error, not a silent skip)."""
        base_url, model = os.environ.get(ENV_BASE_URL), os.environ.get(ENV_MODEL)
        if not base_url and not model:
            return None
        if not base_url or not model:
            raise EvalInputError(f"an LLM judge needs both {ENV_BASE_URL} and {ENV_MODEL}; only one is set")
        return cls(base_url=base_url, model=model,
                   api_key=os.environ.get(ENV_API_KEY) or os.environ.get("OPENAI_API_KEY"))

    @property
    def name(self) -> str:
        return f"{self.model}@{self.base_url}"

    def complete(self, prompt: str, temperature: float = 0.0) -> str:
        """The judge's reply text; raises RuntimeError naming the endpoint when the call fails."""
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": temperature, "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = self.base_url.rstrip("/") + "/chat/completions"
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                data = json.loads(response.read().decode())
        except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as exc:
            raise RuntimeError(f"judge {self.name}: {type(exc).__name__}: {exc}") from exc
        try:
            return str(data["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError) as exc:
            raise RuntimeError(f"judge {self.name}: unexpected reply {str(data)[:200]}") from exc
