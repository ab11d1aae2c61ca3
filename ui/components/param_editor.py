"""The typed editor of one model's launch parameters: an input per `ModelParams` field, empty = inherited (the value
it inherits is shown), errors on the field they belong to. Values are read back into the body that
`core.parameters.save_model` validates; nothing here decides what is valid."""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from nicegui import ui

from core.model_params import ModelParams

INHERIT = '(inherit)'
GROUPS = {
    'Context and threads': ('ctx_size', 'threads', 'threads_batch', 'batch_size', 'ubatch_size', 'parallel'),
    'GPU': ('n_gpu_layers', 'main_gpu', 'split_mode', 'tensor_split', 'flash_attn', 'rpc'),
    'KV cache and memory': ('cache_type_k', 'cache_type_v', 'mlock', 'no_mmap'),
    'RoPE': ('rope_scaling', 'rope_scale', 'rope_freq_base', 'rope_freq_scale', 'yarn_orig_ctx'),
    'Features': ('embeddings', 'pooling', 'jinja', 'chat_template', 'chat_template_file', 'mmproj', 'alias'),
    'Scheduler': ('ttl', 'pinned', 'preload', 'aliases'),
    'Advanced': ('extra_args', 'env', 'request'),
}


def _kind(name: str) -> tuple[str, Any]:
    """('int'|'float'|'bool'|'choice'|'text'|'lines'|'floats'|'env'|'json', choices) from the field's annotation."""
    annotation = ModelParams.model_fields[name].annotation
    args = [a for a in get_args(annotation) if a is not type(None)] if _is_union(annotation) else [annotation]
    t = args[0] if args else annotation
    if get_origin(t) is Literal:
        return 'choice', list(get_args(t))
    if t is bool:
        return 'bool', None
    if t is int:
        return 'int', None
    if t is float:
        return 'float', None
    if t in (str, Path):
        return 'text', None
    if get_origin(t) is list:
        return ('floats' if get_args(t) == (float,) else 'lines'), None
    if get_origin(t) is dict:
        return 'env', None
    return 'json', None


def _is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (typing.Union, types.UnionType)


def _bounds(name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in ModelParams.model_fields[name].metadata:
        for attr, key in (('ge', 'min'), ('gt', 'min'), ('le', 'max'), ('lt', 'max')):
            if getattr(m, attr, None) is not None:
                out[key] = getattr(m, attr)
    return out


def _shown(value: Any, kind: str) -> str:
    if value is None:
        return ''
    if kind == 'lines':
        return '\n'.join(str(v) for v in value)
    if kind == 'floats':
        return ', '.join(f'{v:g}' for v in value)
    if kind == 'env':
        return '\n'.join(f'{k}={v}' for k, v in value.items())
    if kind == 'json':
        return json.dumps(value, indent=2)
    return str(value)


def label_of(name: str) -> str:
    return name.replace('_', ' ').capitalize()


class ParamEditor:
    """`own`: the model's saved overrides; `inherited`: what the defaults give each field (shown as the hint)."""

    def __init__(self, own: dict[str, Any], inherited: dict[str, Any], descriptions: dict[str, str]) -> None:
        self.inputs: dict[str, Any] = {}
        self.kinds: dict[str, str] = {}
        for group, names in GROUPS.items():
            with ui.expansion(group, value=group == 'Context and threads').classes('w-full').props('dense'):
                with ui.grid().classes('grid-cols-1 md:grid-cols-2 gap-x-4 gap-y-1 w-full'):
                    for name in names:
                        self._field(name, own.get(name), inherited.get(name), descriptions.get(name, ''))

    def _field(self, name: str, value: Any, inherited: Any, help_text: str) -> None:
        kind, choices = _kind(name)
        self.kinds[name] = kind
        hint = (
            f'inherits {_shown(inherited, kind) or "llama-server default"}'
            if inherited is not None
            else ('unset: llama-server default' if name not in GROUPS['Scheduler'] else 'unset')
        )
        label = label_of(name)
        element: Any
        if kind in ('int', 'float'):
            # No min/max/precision on the input: Quasar would change what was typed (-5 to 0, 1.5 to 2) instead of
            # letting the core's validation say what is wrong, on this field.
            element = ui.number(label, value=value, step=1 if kind == 'int' else None).props('clearable')
            limits = ', '.join(f'{k} {v:g}' for k, v in _bounds(name).items())
            element.props['hint'] = f'{help_text} ({hint}{"; " + limits if limits else ""})'
        elif kind in ('bool', 'choice'):
            options = {INHERIT: f'{INHERIT}: {_shown(inherited, kind) or "default"}'}
            if kind == 'bool':
                options.update({'true': 'on', 'false': 'off'})
                current = INHERIT if value is None else ('true' if value else 'false')
            else:
                options.update({c: c for c in choices})
                current = INHERIT if value is None else value
            element = ui.select(options, value=current, label=label)
            element.props['hint'] = help_text
        elif kind in ('lines', 'env', 'json'):
            element = ui.textarea(label, value=_shown(value, kind)).props('autogrow')
            element.props['hint'] = f'{help_text} ({hint})'
        else:
            element = ui.input(label, value=_shown(value, kind)).props('clearable')
            element.props['hint'] = f'{help_text} ({hint})'
        element.classes('w-full').mark(f'param-{name}')
        self.inputs[name] = element

    def body(self) -> dict[str, Any]:
        """The overrides as typed in: only fields with a value (empty = inherit). Unparseable text is passed on as
        text, so the core's validation names the field."""
        # `request` always goes: left out, the core would keep the saved block (what an API caller wants), so an
        # emptied field could never clear it.
        out: dict[str, Any] = {'request': None}
        for name, element in self.inputs.items():
            kind, raw = self.kinds[name], element.value
            if raw in (None, '', INHERIT):
                continue
            if kind == 'bool':
                out[name] = raw == 'true'
            elif kind == 'int':
                out[name] = int(raw) if float(raw).is_integer() else raw
            elif kind == 'float':
                out[name] = float(raw)
            elif kind == 'lines':
                out[name] = [line.strip() for line in str(raw).splitlines() if line.strip()]
            elif kind == 'floats':
                out[name] = _floats(str(raw))
            elif kind == 'env':
                out[name] = dict(_pair(line) for line in str(raw).splitlines() if line.strip())
            elif kind == 'json':
                out[name] = _json(str(raw))
            else:
                out[name] = str(raw).strip()
        return out

    def show_errors(self, errors: list[tuple[str, str]]) -> Any:
        """Put each error on its field (the first part of a dotted path); returns the first field's element."""
        self.clear_errors()
        first = None
        for field, message in errors:
            element = self.inputs.get(field.split('.')[0])
            if element is None:
                continue
            element.props['error'] = True
            element.props['error-message'] = message
            element.update()
            first = first or element
        return first

    def clear_errors(self) -> None:
        for element in self.inputs.values():
            if element.props.get('error'):
                element.props(remove='error error-message')


def _floats(text: str) -> Any:
    try:
        return [float(x) for x in text.replace(';', ',').split(',') if x.strip()]
    except ValueError:
        return text


def _pair(line: str) -> tuple[str, str]:
    key, _, value = line.partition('=')
    return key.strip(), value.strip()


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
