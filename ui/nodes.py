"""Nodes: every configured remote (other Llama Async Proxy nodes and OpenAI-compatible servers) with its state,
last check, memory and live figures (a node's), and its models with their state there; a node's models load and
unload from here through its own API. Everything shown comes from `core.remotes` (the remotes' own answers)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nicegui import context, ui

from ui.components.remote_models import STOPPED, model_row
from ui.format import DASH, clock, human_bytes, pct, rate
from ui.layout import Working, empty, live, page

if TYPE_CHECKING:
    from nicegui import Client

    from core.remotes import Remote
    from core.system import System

STATE_COLORS = {'up': 'positive', 'down': 'negative', 'checking': 'grey'}
RPC_COLORS = {'ready': 'positive', 'failed': 'negative', 'restarting': 'warning', 'starting': 'primary'}
MODEL_COLUMNS = [
    {'name': 'id', 'label': 'Model', 'field': 'id', 'align': 'left'},
    {'name': 'status', 'label': 'State there', 'field': 'status', 'align': 'left'},
    {'name': 'fit', 'label': 'Fit there', 'field': 'fit', 'align': 'left'},
    {'name': 'size', 'label': 'Size', 'field': 'size', 'align': 'right'},
    {'name': 'actions', 'label': '', 'field': 'actions', 'align': 'right'},
]
ACTIONS_SLOT = r"""
<q-td :props="props">
  <q-btn v-if="props.row.can_load" size="sm" flat dense color="primary" icon="play_arrow" label="Load"
         @click="() => $parent.$emit('load', props.row)" />
  <q-btn v-if="props.row.can_unload" size="sm" flat dense color="negative" icon="stop" label="Unload"
         @click="() => $parent.$emit('unload', props.row)" />
</q-td>
"""


def figures(remote: dict[str, Any]) -> list[tuple[str, str]]:
    """A node's memory and live figures, as shown; an OpenAI server has none but its latency."""
    out = [('Checked', clock(remote.get('checked_at'))), ('Latency', _ms(remote.get('latency_ms')))]
    out.append(('In flight from here', str(remote.get('inflight') or 0)))
    mon = remote.get('monitoring')
    if mon:
        total, used = mon.get('ram_total_bytes'), mon.get('ram_used_bytes')
        out.append(('CPU', pct(mon.get('cpu_pct'))))
        out.append(('RAM', f'{human_bytes(used)} of {human_bytes(total)}' if total else DASH))
        for g in mon.get('gpus') or []:
            name = g.get('name') or 'GPU'
            out.append(
                (name, f'{human_bytes(g.get("memory_used_bytes"))} of {human_bytes(g.get("memory_total_bytes"))}')
            )
        out.append(('Requests', rate(mon.get('requests_per_s'), 'req/s')))
        out.append(('Models running', str(mon.get('models_running', DASH))))
    rpc = remote.get('rpc_server')
    if rpc and rpc.get('status') not in STOPPED:
        free = sum(int(d.get('free_bytes') or 0) for d in rpc.get('devices') or [])
        out.append(('RPC worker', f'{rpc.get("status")} on {rpc.get("endpoint")}, {human_bytes(free)} free'))
    return out


def _ms(value: Any) -> str:
    return DASH if value is None else f'{value:.0f} ms'


class RemoteCard:
    """One remote: a header with its state, its figures, and its models (with Load / Unload on a node)."""

    def __init__(self, system: System, client: Client, remote: Remote) -> None:
        self.system, self.client, self.name = system, client, remote.name
        with ui.card().classes('w-full gap-2').mark(f'node-{remote.name}'):
            with ui.row().classes('w-full items-center gap-2'):
                ui.icon('lan' if remote.params.kind == 'node' else 'cloud').classes('text-xl text-indigo-500')
                ui.label(remote.name).classes('text-lg font-semibold')
                self.state = ui.badge().mark(f'node-state-{remote.name}')
                ui.label(remote.params.url).classes('text-sm lap-muted break-all')
                ui.space()
                ui.label('Llama Async Proxy node' if remote.params.kind == 'node' else 'OpenAI-compatible server')
            self.error = ui.label().classes('text-sm text-negative break-all').mark(f'node-error-{remote.name}')
            self.facts = ui.row().classes('gap-x-6 gap-y-1 flex-wrap text-sm').mark(f'node-figures-{remote.name}')
            with ui.element('div').classes('overflow-x-auto w-full'):
                self.table = ui.table(columns=MODEL_COLUMNS, rows=[], row_key='id')
                self.table.props('flat dense no-data-label="No models listed (yet)"')
                self.table.classes('w-full').mark(f'node-models-{remote.name}')
            self.table.add_slot('body-cell-actions', ACTIONS_SLOT)
            self.table.on('load', lambda e: self.control(e.args, 'load'))
            self.table.on('unload', lambda e: self.control(e.args, 'unload'))
        self.show(remote.as_dict())

    def show(self, d: dict[str, Any]) -> None:
        self.state.set_text(d['state'])
        self.state.props(f'color={STATE_COLORS.get(d["state"], "grey")}')
        self.error.set_text(d.get('error') or '')
        self.error.set_visibility(bool(d.get('error')))
        self.facts.clear()
        with self.facts:
            for label, value in figures(d):
                with ui.row().classes('gap-1 items-baseline no-wrap'):
                    ui.label(label).classes('lap-muted')
                    ui.label(value)
        self.table.rows = [model_row(d, m) for m in d['models']]

    async def control(self, row: dict[str, Any], action: str) -> None:
        working = Working(self.client, f'{action.title()}ing {row["own_id"]} on {self.name}…')
        status, body = await self.system.remotes.control(self.name, row['own_id'], action)
        if status == 200:
            working.done(f'{row["own_id"]} {action}ed on {self.name}', type='positive')
        else:
            detail = (body or {}).get('detail')
            message = detail.get('message') if isinstance(detail, dict) else str(detail)
            working.done(f'{action.title()} on {self.name} failed: {message}', type='negative')


class RpcWorkerCard:
    """This machine's llama.cpp RPC worker: state, endpoint, the devices it lends with their memory, Start / Stop."""

    def __init__(self, system: System, client: Client) -> None:
        self.system, self.client = system, client
        with ui.card().classes('w-full gap-2').mark('rpc-worker'):
            with ui.row().classes('w-full items-center gap-2'):
                ui.icon('memory').classes('text-xl text-indigo-500')
                ui.label('RPC worker on this machine').classes('text-lg font-semibold')
                self.state = ui.badge().mark('rpc-state')
                self.endpoint = ui.label().classes('text-sm lap-muted')
                ui.space()
                self.start = ui.button('Start', icon='play_arrow', on_click=lambda: self.control('start'))
                self.start.props('flat dense').mark('rpc-start')
                self.stop = ui.button('Stop', icon='stop', on_click=lambda: self.control('stop'))
                self.stop.props('flat dense color=negative').mark('rpc-stop')
            ui.label(
                'Lends this machine to a model loaded elsewhere (its "rpc" parameter lists host:port). The RPC '
                'protocol has no authentication: keep it on loopback or a network you trust.'
            ).classes('text-sm lap-muted')
            self.error = ui.label().classes('text-sm text-negative break-all').mark('rpc-error')
            self.devices = ui.column().classes('gap-0 text-sm').mark('rpc-devices')
        self.show()

    def show(self) -> None:
        d = self.system.rpc.describe()
        status = str(d['status'])
        self.state.set_text(status)
        self.state.props(f'color={RPC_COLORS.get(status, "grey")}')
        self.endpoint.set_text(d['endpoint'])
        self.error.set_text(d.get('error') or '')
        self.error.set_visibility(bool(d.get('error')))
        running = status not in STOPPED
        self.start.set_visibility(not running and bool(d.get('binary')))
        self.stop.set_visibility(running)
        self.devices.clear()
        with self.devices:
            for dev in d.get('devices') or []:
                ui.label(
                    f'{dev["name"]}: {dev["description"]}, {human_bytes(dev["free_bytes"])} free of '
                    f'{human_bytes(dev["total_bytes"])}'
                )

    async def control(self, action: str) -> None:
        from core.supervisor.rpc_worker import RpcError

        working = Working(self.client, f'{"Starting" if action == "start" else "Stopping"} the RPC worker…')
        try:
            d = await (self.system.rpc.run() if action == 'start' else self.system.rpc.halt())
        except RpcError as e:
            working.done(f'RPC worker: {e.message}', type='negative')
            return
        working.done(f'RPC worker {d["status"]} on {d["endpoint"]}', type='positive')


def register(system: System) -> None:
    @page(system, '/nodes', 'Nodes')
    async def nodes() -> None:
        client = context.client
        ui.label('Other machines').classes('text-lg font-medium')
        ui.label(
            'Configured under Settings → Other machines (or "remotes" in the config file). Requests for their '
            "models are routed there; a node's models can be loaded and unloaded here."
        ).classes('text-sm lap-muted')
        worker = RpcWorkerCard(system, client)
        body = ui.column().classes('w-full gap-3')
        cards: dict[str, RemoteCard] = {}
        drawn: list[list[str]] = []  # the remotes the cards were built for (none yet: not drawn)

        def redraw() -> None:
            remotes = system.remotes.all()
            names = [r.name for r in remotes]
            if not drawn or names != drawn[-1]:
                drawn[:] = [names]
                body.clear()
                cards.clear()
                with body:
                    if not remotes:
                        empty('No other machines configured').mark('nodes-empty')
                    for remote in remotes:
                        cards[remote.name] = RemoteCard(system, client, remote)
                return
            for remote in remotes:
                cards[remote.name].show(remote.as_dict())

        redraw()
        live(system, ['remotes'], redraw, every_ms=500)
        live(system, ['rpc'], worker.show, every_ms=300)
