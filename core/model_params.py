"""Per-model launch parameters. `Settings.defaults` holds values for every model; per model, `None` inherits.

Every launch field maps to a llama-server flag in `core/supervisor/argv.py`; `None` means "not passed", so the
binary's own default applies. Supervisor-only fields (`ttl`, `pinned`, `preload`, `aliases`, `request`) never reach
the command line, and a change of them applies to a running model without a restart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core import launch_policy
from core.request_params import RequestParams

CacheType = Literal['f32', 'f16', 'bf16', 'q8_0', 'q4_0', 'q4_1', 'iq4_nl', 'q5_0', 'q5_1']
OnOffAuto = Literal['on', 'off', 'auto']


class ModelParams(BaseModel):
    model_config = ConfigDict(extra='forbid')

    # --- context, batching, threads ---
    ctx_size: int | None = Field(None, ge=0, description='Context size (-c); 0 = from the model')
    threads: int | None = Field(None, ge=1, description='CPU threads for generation (-t)')
    threads_batch: int | None = Field(None, ge=1, description='CPU threads for prompt processing (-tb)')
    batch_size: int | None = Field(None, ge=1, description='Logical batch size (-b)')
    ubatch_size: int | None = Field(None, ge=1, description='Physical batch size (-ub)')
    parallel: int | None = Field(None, ge=1, description='Parallel slots (-np)')
    # --- GPU ---
    n_gpu_layers: int | None = Field(None, ge=-1, description='Layers offloaded to the GPU (-ngl); -1 = all')
    main_gpu: int | None = Field(None, ge=0, description='GPU for the model with split_mode none (-mg)')
    split_mode: Literal['none', 'layer', 'row', 'tensor'] | None = Field(None, description='Split across GPUs (-sm)')
    tensor_split: list[float] | None = Field(None, description='Fraction of the model per GPU (-ts), e.g. [3, 1]')
    flash_attn: OnOffAuto | None = Field(None, description='Flash attention (-fa)')
    rpc: list[str] | None = Field(
        None,
        description='llama.cpp RPC workers (host:port, each an rpc-server) that hold part of the model (--rpc); '
        'with n_gpu_layers, layers go to them by their memory',
    )
    # --- KV cache and memory ---
    cache_type_k: CacheType | None = Field(None, description='KV cache type for K (-ctk)')
    cache_type_v: CacheType | None = Field(None, description='KV cache type for V (-ctv)')
    mlock: bool | None = Field(None, description='Keep the model in RAM (no swapping)')
    no_mmap: bool | None = Field(None, description='Read the model into memory instead of memory-mapping it')
    # --- RoPE ---
    rope_scaling: Literal['none', 'linear', 'yarn'] | None = Field(None, description='RoPE scaling method')
    rope_scale: float | None = Field(None, gt=0, description='RoPE context scaling factor')
    rope_freq_base: float | None = Field(None, gt=0, description='RoPE base frequency')
    rope_freq_scale: float | None = Field(None, gt=0, description='RoPE frequency scaling factor')
    yarn_orig_ctx: int | None = Field(None, ge=0, description='YaRN original context size of the model')
    # --- features ---
    embeddings: bool | None = Field(None, description='Serve embeddings (--embeddings)')
    pooling: Literal['none', 'mean', 'cls', 'last', 'rank'] | None = Field(None, description='Embedding pooling')
    jinja: bool | None = Field(None, description='Use the jinja chat template engine')
    chat_template: str | None = Field(None, min_length=1, description='Chat template override (name or jinja)')
    chat_template_file: Path | None = Field(None, description='Chat template override from a file')
    mmproj: Path | None = Field(None, description='Multimodal projector; empty = the one found next to the model')
    alias: str | None = Field(None, min_length=1, description='Model name(s) llama-server reports, comma-separated')
    extra_args: list[str] | None = Field(
        None, description='More llama-server flags (sampling, performance, cache, context), one flag or value per item'
    )
    env: dict[str, str] | None = Field(
        None, description='Device selection and GGML_/OMP_/CUDA_ tuning variables for the llama-server process'
    )
    # --- supervisor ---
    ttl: float | None = Field(None, ge=0, description='Seconds idle before the model is unloaded; 0 = never')
    pinned: bool | None = Field(None, description='Never evict this model to make room for another')
    preload: bool | None = Field(None, description='Start this model when the app starts (and at once when set)')
    aliases: list[str] | None = Field(
        None, description='More names clients may ask for this model by (its id always works)'
    )

    request: RequestParams | None = Field(None, description='Applied to each request body by the proxy')

    @field_validator('rpc')
    @classmethod
    def _endpoints(cls, v: list[str] | None) -> list[str] | None:
        for item in v or []:
            host, sep, port = item.rpartition(':')
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c in item for c in ', '):
                raise ValueError(f'{item!r} is not host:port (e.g. 192.168.1.20:50052)')
        return v or None

    @field_validator('tensor_split')
    @classmethod
    def _non_negative(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or any(x < 0 for x in v)):
            raise ValueError('needs one non-negative number per GPU')
        return v

    # The launch policy's static part (core/launch_policy.py), so that a config file or PUT /api/config cannot
    # hold what the parameters API refuses; file paths are checked against the model folders at save and spawn.
    @field_validator('extra_args')
    @classmethod
    def _safe_extra_args(cls, v: list[str] | None) -> list[str] | None:
        launch_policy.check_extra_args(v or [], None)
        return v

    @field_validator('env')
    @classmethod
    def _safe_env(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        launch_policy.check_env(v)
        return v

    def overlay(self, override: ModelParams | None) -> ModelParams:
        """These values with every field that `override` sets (not None) on top."""
        if override is None:
            return self.model_copy()
        return self.model_copy(update=override.model_dump(exclude_none=True, exclude={'request'}) | _request(override))


def _request(override: ModelParams) -> dict[str, RequestParams]:
    return {'request': override.request} if override.request is not None else {}


def effective_params(settings: object, model_id: str) -> ModelParams:
    """`settings.defaults` overlaid by `settings.models[model_id]`."""
    defaults: ModelParams = getattr(settings, 'defaults', None) or ModelParams()
    models: dict[str, ModelParams] = getattr(settings, 'models', None) or {}
    return defaults.overlay(models.get(model_id))
