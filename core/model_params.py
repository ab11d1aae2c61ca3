"""Per-model launch parameters. `Settings.defaults` holds values for every model; per model, `None` inherits."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from core.request_params import RequestParams


class ModelParams(BaseModel):
    model_config = ConfigDict(extra='forbid')

    ctx_size: int | None = Field(None, ge=0, description='Context size (-c); 0 = from the model')
    n_gpu_layers: int | None = Field(None, ge=-1, description='Layers offloaded to the GPU (-ngl); -1 = all')
    threads: int | None = Field(None, ge=1, description='CPU threads for generation (-t)')
    batch_size: int | None = Field(None, ge=1, description='Logical batch size (-b)')
    parallel: int | None = Field(None, ge=1, description='Parallel slots (-np)')
    request: RequestParams | None = Field(None, description='Applied to each request body by the proxy')
