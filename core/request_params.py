"""Request-time parameters: applied by the proxy to each request body, so changes need no process restart."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class RequestParams(BaseModel):
    model_config = ConfigDict(extra='forbid')

    defaults: dict[str, Any] = Field(
        default_factory=dict, description='Body fields set when the client did not send them (e.g. temperature)'
    )
    force: dict[str, Any] = Field(default_factory=dict, description='Body fields always overwritten')
    strip: list[str] = Field(default_factory=list, description='Body fields removed before forwarding')
    max_tokens_cap: int | None = Field(None, ge=1, description='Upper bound on max_tokens (also set when absent)')


def merge(base: RequestParams | None, override: RequestParams | None) -> RequestParams | None:
    """Per-model request params on top of the global ones: dicts merged key by key, strip lists joined."""
    if base is None or override is None:
        return override if base is None else base
    return RequestParams(
        defaults={**base.defaults, **override.defaults},
        force={**base.force, **override.force},
        strip=list(dict.fromkeys([*base.strip, *override.strip])),
        max_tokens_cap=override.max_tokens_cap if override.max_tokens_cap is not None else base.max_tokens_cap,
    )


def for_model(settings: Any, model_id: str) -> RequestParams | None:
    """The request params in force for `model_id` now (read per request, so edits apply without a restart)."""
    defaults = getattr(getattr(settings, 'defaults', None), 'request', None)
    model = (getattr(settings, 'models', None) or {}).get(model_id)
    return merge(defaults, getattr(model, 'request', None))


# The fields different APIs use for "how many tokens to generate".
MAX_TOKENS_FIELDS = ('max_tokens', 'max_completion_tokens', 'n_predict', 'max_output_tokens')


def apply(body: dict[str, Any], params: RequestParams | None, max_tokens_field: str = 'max_tokens') -> dict[str, Any]:
    """`body` with the params applied (a new dict; the client's is untouched). Order: strip, defaults, force, cap.

    `max_tokens_field` is the field the route uses when the client sent none (the cap then sets it).
    """
    if params is None:
        return body
    out = {k: v for k, v in body.items() if k not in params.strip}
    for key, value in params.defaults.items():
        out.setdefault(key, value)
    out.update(params.force)
    cap = params.max_tokens_cap
    if cap is not None:
        present = [f for f in MAX_TOKENS_FIELDS if f in out]
        for f in present:
            v = out[f]
            # llama-server takes -1 (or a non-positive value) as "unlimited": that is over any cap too.
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v > cap:
                out[f] = cap
        if not present:
            out[max_tokens_field] = cap
    return out
