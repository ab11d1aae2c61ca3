from __future__ import annotations

import asyncio
import hmac
from typing import Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import JSONResponse

from core.api import BODY_NOT_JSON, get_system
from core.settings import REDACTED, RESTART_FIELDS, SECRET_FIELDS, ConfigInvalid, keep_remote_keys, redact
from core.system import System

router = APIRouter(prefix='/api', tags=['config'])


@router.get('/config')
def get_config(system: System = Depends(get_system)) -> dict[str, Any]:
    """Effective settings (API keys redacted), the source of each value, and any rejected values."""
    return system.config.describe()


@router.put('/config', responses={400: BODY_NOT_JSON, 422: {'description': 'Field errors; nothing was saved'}})
async def put_config(patch: dict[str, Any] = Body(...), system: System = Depends(get_system)) -> Any:
    """Validate and save the given fields atomically, then apply them: `applied` lists the running models that
    restart for it and those that keep running; `restart_required` the fields that need the app restarted."""
    try:
        result, applied = await system.save_config(patch)
    except ConfigInvalid as e:
        return JSONResponse(status_code=422, content={'detail': [err.as_dict() for err in e.errors]})
    return {
        'saved': True,
        'changed': result.changed,
        'restart_required': result.restart_required,
        'overridden': result.overridden,
        'applied': applied,
        **system.config.describe(),
    }


@router.get('/config/export', responses={403: {'description': 'Secrets asked for without an API key'}})
def export_config(request: Request, secrets: bool = False, system: System = Depends(get_system)) -> Any:
    """The config file's settings as JSON, for `POST /api/config/import` elsewhere. API keys are `***` unless
    `secrets=true` is asked with one of them (a signed-in browser session is not enough)."""
    if secrets and not _has_api_key(request, system.config.settings.api_keys):
        return JSONResponse(status_code=403, content={'detail': 'secrets=true needs an API key in the request'})
    return system.config.file_data(secrets=secrets)


@router.post('/config/import', responses={400: BODY_NOT_JSON, 422: {'description': 'Field errors; nothing was saved'}})
async def import_config(
    data: dict[str, Any] = Body(...), dry_run: bool = False, system: System = Depends(get_system)
) -> Any:
    """Replace the config file's settings with `data` (an export): validated as a whole, written atomically and
    applied like a save. `dry_run=true` changes nothing and says what would change and which running models
    would restart. Local-only fields (paths the app trusts) keep their values; `***` keys keep the keys in force."""
    config = system.config
    try:
        data = _keep_redacted_secrets(data, config.file_data(secrets=True))
        candidate = config.candidate(data)
    except ConfigInvalid as e:
        return JSONResponse(status_code=422, content={'detail': [err.as_dict() for err in e.errors]})
    diff = _diff(config.settings.model_dump(mode='json'), candidate.model_dump(mode='json'))
    restart = sorted(set(diff) & RESTART_FIELDS)
    if dry_run:
        plan = await system.scheduler.preview(candidate)
        return {'dry_run': True, 'diff': diff, 'restart_required': restart, 'plan': plan}
    try:
        await asyncio.to_thread(config.replace, data)
    except ConfigInvalid as e:
        return JSONResponse(status_code=422, content={'detail': [err.as_dict() for err in e.errors]})
    return {'saved': True, 'diff': diff, 'restart_required': restart, 'applied': await system.apply_config()}


def _has_api_key(request: Request, keys: list[str]) -> bool:
    auth = request.headers.get('authorization', '')
    given = auth[7:].strip() if auth.lower().startswith('bearer ') else request.headers.get('x-api-key', '')
    return bool(given) and any(hmac.compare_digest(given.encode(), k.encode()) for k in keys)


def _keep_redacted_secrets(data: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """An export's `***` stands for the saved key at its place (an export lists them in order); one with no
    saved key there is dropped. Never a key of its own (the settings refuse `***` too)."""
    out = dict(data)
    for name in SECRET_FIELDS:
        value = out.get(name)
        if value == REDACTED:  # a single secret (hf_token): the saved one
            out[name] = saved.get(name)
            continue
        if not isinstance(value, list):
            continue
        known = saved.get(name) or []
        keys = [known[i] if v == REDACTED and i < len(known) else v for i, v in enumerate(value)]
        out[name] = [k for k in keys if k != REDACTED]
    if isinstance(out.get('remotes'), list):  # a remote's `***` key: the saved key of the remote of that name
        out['remotes'] = keep_remote_keys(out['remotes'], saved.get('remotes'))
    return out


def _diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Changed settings, `{field: {"from": old, "to": new}}`, secrets redacted."""
    out = {}
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            before, after = old.get(name), new.get(name)
            if name in SECRET_FIELDS:
                before, after = _secret_summary(before), _secret_summary(after)
            elif name == 'remotes':
                before, after = redact({'remotes': before})['remotes'], redact({'remotes': after})['remotes']
            out[name] = {'from': before, 'to': after}
    return out


def _secret_summary(value: Any) -> str:
    """What a change of a secret shows: how many keys, or whether the token is set; never the value."""
    if isinstance(value, list):
        return f'{len(value)} key(s)'
    return 'set' if value else 'not set'
