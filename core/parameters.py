"""Launch parameters as the API and the Models page save them: validated the way they would launch (the model's
overrides on top of the defaults, checked against the launch policy and the current llama-server's `--help`),
then saved and applied through `System`, so a running model restarts only when its command line changed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from core.launch_policy import ArgvError
from core.model_params import ModelParams
from core.settings import ConfigInvalid, FieldError

if TYPE_CHECKING:
    from core.system import System


def dump(params: ModelParams | None) -> dict[str, Any]:
    return {} if params is None else params.model_dump(mode='json', exclude_none=True)


def descriptions() -> dict[str, str]:
    return {name: f.description or '' for name, f in ModelParams.model_fields.items()}


def _errors(*pairs: tuple[str, str]) -> ConfigInvalid:
    return ConfigInvalid([FieldError(f, m, 'request') for f, m in pairs])


async def validated(
    system: System, body: dict[str, Any], current: ModelParams | None, base: ModelParams | None
) -> ModelParams:
    """`body` as ModelParams (keeping the saved `request` block when the body has none), checked as it would
    launch: on top of `base` (the defaults) for a per-model override. Raises ConfigInvalid with field errors."""
    if 'request' not in body and current is not None and current.request is not None:
        body = {**body, 'request': current.request.model_dump(mode='json')}
    try:
        params = ModelParams.model_validate(body)
    except ValidationError as exc:
        raise _errors(*(('.'.join(str(p) for p in e['loc']) or '(root)', e['msg']) for e in exc.errors())) from None
    try:
        await system.scheduler.check_params(params if base is None else base.overlay(params))
    except ArgvError as e:
        raise _errors((e.field, e.message)) from None
    return params


async def save_defaults(system: System, body: dict[str, Any]) -> dict[str, list[str]]:
    """Replace the global defaults; returns `applied` (what restarts). Raises ConfigInvalid."""
    params = await validated(system, body, system.config.settings.defaults, None)
    return (await system.save_config({'defaults': dump(params)}))[1]


async def save_model(system: System, model_id: str, body: dict[str, Any]) -> dict[str, list[str]]:
    """Replace one model's overrides (an empty object removes them); returns `applied`. Raises ConfigInvalid
    (and KeyError for an unknown model)."""
    entry = system.library.get(model_id)
    if entry is None:
        raise KeyError(model_id)
    s = system.config.settings
    params = await validated(system, body, s.models.get(entry.id), s.defaults)
    owners = {name: system.library.get(name) for name in params.aliases or []}
    taken = [f'{name!r} ({other.id})' for name, other in owners.items() if other is not None and other.id != entry.id]
    if taken:
        raise _errors(('aliases', f"already another model's name: {', '.join(taken)}"))
    return (await system.save_model_params(entry.id, dump(params) or None))[1]


def model_view(system: System, model_id: str) -> dict[str, Any]:
    """The model's own overrides, the defaults, and the effective result it launches with."""
    s = system.config.settings
    return {
        'model': model_id,
        'params': dump(s.models.get(model_id)),
        'defaults': dump(s.defaults),
        'effective': dump(system.scheduler.params_for(model_id)),
        'descriptions': descriptions(),
    }
