"""How long a request will hold its llama-server slot, from the speeds the model's recent requests reported.

The proxy forwards a non-streaming request to llama-server as it is only when the whole job should take less than
`QUICK_S`: llama-server notices a closed connection of a plain request only when its wait for results times out
(1 s) with no result for any task, so under other traffic (the metrics scrape, other slots' tokens) it may never
notice. A longer job is streamed from llama-server and assembled, and a disconnect stops it at the next token.
"""

from __future__ import annotations

from typing import Any

from core.request_params import MAX_TOKENS_FIELDS

QUICK_S = 0.5
# Prompt speed is measured on the usual short prompts and falls with length (attention): never quick past this.
MAX_QUICK_BODY_BYTES = 8192
BYTES_PER_TOKEN = 3.0  # prompt bytes per token, on the low side (English ~4, code and CJK ~3): estimates high
WEIGHT = 0.3  # of the newest measurement in the running average


def token_limit(body: dict[str, Any]) -> int | None:
    """The most tokens the request may generate, or None when it is unbounded. llama-server takes the first of
    n_predict, max_completion_tokens and max_tokens that is present: every one present must be a positive
    limit, and the largest counts."""
    limits = [body[f] for f in MAX_TOKENS_FIELDS if f in body]
    if not limits or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in limits):
        return None
    return max(limits)


def single_task(body: dict[str, Any]) -> bool:
    """One generation: not `n`/`n_cmpl` choices, nor a list of prompts (a list of ints is one tokenized prompt)."""
    for field in ('n', 'n_cmpl'):
        if body.get(field, 1) != 1:
            return False
    prompt = body.get('prompt')
    return not (isinstance(prompt, list) and len(prompt) > 1 and not all(isinstance(p, int) for p in prompt))


class SlotTime:
    def __init__(self) -> None:
        self._speeds: dict[str, tuple[float, float]] = {}  # model id -> (prompt tokens/s, generated tokens/s)
        self._servers: dict[str, int] = {}  # model id -> the pid the speeds were measured on

    def observe(self, model_id: str, prompt_tps: float | None, gen_tps: float | None) -> None:
        """One finished generation's own figures (llama-server's `timings`); either may be missing."""
        old = self._speeds.get(model_id)
        if old is None:
            if prompt_tps and gen_tps:
                self._speeds[model_id] = (prompt_tps, gen_tps)
            return
        self._speeds[model_id] = (_mix(old[0], prompt_tps), _mix(old[1], gen_tps))

    def serving(self, model_id: str, pid: int) -> None:
        """The model's requests go to this server now: speeds measured on an earlier one (other parameters,
        perhaps no GPU) no longer count."""
        if self._servers.get(model_id) != pid:
            self._servers[model_id] = pid
            self._speeds.pop(model_id, None)

    def estimate_s(self, model_id: str, prompt_bytes: int, max_tokens: object) -> float | None:
        """Seconds the request should take, or None when it cannot be told (no speeds yet, no token limit)."""
        speeds = self._speeds.get(model_id)
        if speeds is None or not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens <= 0:
            return None
        return prompt_bytes / BYTES_PER_TOKEN / speeds[0] + max_tokens / speeds[1]

    def quick(self, model_id: str, prompt_bytes: int, max_tokens: object) -> bool:
        if prompt_bytes > MAX_QUICK_BODY_BYTES:
            return False
        estimate = self.estimate_s(model_id, prompt_bytes, max_tokens)
        return estimate is not None and estimate <= QUICK_S

    def quick_request(self, model_id: str, body: dict[str, Any], body_bytes: int) -> bool:
        """Whether this (already parameter-applied) non-streaming generation is quick enough to go plain."""
        return single_task(body) and self.quick(model_id, body_bytes, token_limit(body))


def _mix(old: float, new: float | None) -> float:
    return old if not new else (1 - WEIGHT) * old + WEIGHT * new
