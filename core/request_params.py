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
