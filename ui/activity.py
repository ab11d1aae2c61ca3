"""Activity: the requests in flight (live, each cancellable) and the finished history, filtered, paged (newest
first) and exported. Every figure is the recorder's; its SQLite reads run off the event loop."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import TYPE_CHECKING, Any

from nicegui import context, ui

from core.proxy.activity import CLIENT_CLOSED, INTERRUPTED, is_failure
from ui.format import DASH, clock, count, ms, rate, uptime
from ui.layout import empty, fact, live, notify, page

if TYPE_CHECKING:
    from core.proxy.activity import Activity
    from core.system import System

PAGE_SIZES = {25: '25 / page', 50: '50 / page', 100: '100 / page'}
RANGES = {0: 'Any time', 300: 'Last 5 min', 3600: 'Last hour', 86_400: 'Last 24 h', 604_800: 'Last 7 days'}
STATUSES = {'': 'Any status', 'ok': 'OK (< 400)', 'error': 'Errors (≥ 400, interrupted)'}
STATUS_LABELS = {str(INTERRUPTED): 'interrupted'}  # a filter choice by its name, not its code


def status_text(status: int | None) -> str:
    """A row's status as shown: the code, 'interrupted' (the app stopped before the request ended) or a dash."""
    return DASH if status is None else STATUS_LABELS.get(str(status), str(status))


def _col(name: str, label: str, align: str = 'left') -> dict[str, str]:
    return {'name': name, 'label': label, 'field': name, 'align': align}


LOCAL = 'this machine'
NODES = {'': 'Anywhere', 'local': LOCAL}  # then the remotes found in the history
HISTORY_COLUMNS = [
    _col('time', 'Time'),
    _col('status', 'Status'),  # next to the time: on a phone a failure shows without scrolling sideways
    _col('model', 'Model'),
    _col('node', 'Served by'),
    _col('route', 'Route'),
    _col('ttft', 'TTFT', 'right'),
    _col('duration', 'Duration', 'right'),
    _col('tokens', 'Prompt / gen tokens', 'right'),
    _col('tps', 'Generation', 'right'),
    # Long reasons are cut here and shown whole in the details dialog.
    {**_col('error', 'Error'), 'classes': 'truncate', 'style': 'max-width: 320px'},
]
INFLIGHT_COLUMNS = [
    _col('time', 'Started'),
    _col('model', 'Model'),
    _col('route', 'Route'),
    _col('client', 'Client'),
    _col('stream', 'Stream'),
    _col('elapsed', 'Elapsed', 'right'),
    _col('ttft', 'TTFT', 'right'),
    _col('cancel', ''),
]
# Failures stand out by colour and keep their reason a hover away.
STATUS_SLOT = r"""
<q-td :props="props">
  <q-badge :color="props.row.cancelled ? 'grey' : props.row.failed ? 'negative' : 'positive'" :label="props.value" />
</q-td>
"""
CANCEL_SLOT = r"""
<q-td :props="props">
  <q-btn size="sm" flat dense color="negative" icon="cancel" label="Cancel"
         @click.stop="() => $parent.$emit('cancel', props.row)" />
</q-td>
"""


def _when(ts: float | None) -> str:
    return clock(ts, date=ts is not None and time.time() - ts > 86_400)


def history_row(r: dict[str, Any]) -> dict[str, Any]:
    status = r.get('status')
    return {
        'id': r['id'],
        'time': _when(r.get('ts')),
        'model': r.get('model') or DASH,
        'node': r.get('upstream') or LOCAL,
        'route': r.get('route') or '',
        'status': status_text(status),
        'failed': status is None or is_failure(status),
        'cancelled': status == CLIENT_CLOSED,
        'ttft': ms(r.get('ttft_s')),
        'duration': ms(r.get('duration_s')),
        'tokens': f'{count(r.get("prompt_tokens"))} / {count(r.get("completion_tokens"))}',
        'tps': rate(r.get('gen_tps')),
        'error': r.get('error') or '',
    }


def inflight_row(r: dict[str, Any]) -> dict[str, Any]:
    return {
        'id': r['id'],
        'time': _when(r.get('ts')),
        'model': r.get('model') or DASH,
        'route': r.get('route') or '',
        'client': r.get('client') or DASH,
        'stream': 'yes' if r.get('stream') else 'no',
        'elapsed': uptime(r.get('elapsed_s')),
        'ttft': ms(r.get('ttft_s')),
    }


def _scrolling_table(columns: list[dict[str, str]], marker: str) -> tuple[ui.element, ui.table]:
    """A table in a box that scrolls sideways at phone width; hide the box, not the table, to leave no gap."""
    with ui.element('div').classes('overflow-x-auto w-full') as box:
        table = ui.table(columns=columns, rows=[], row_key='id').classes('w-full').props('flat bordered').mark(marker)
    return box, table


class Inflight:
    """The requests being served now, from memory; redrawn on `requests` events and each second for `Elapsed`."""

    def __init__(self, system: System) -> None:
        self.activity: Activity = system.proxy.activity
        self.box, self.table = _scrolling_table(INFLIGHT_COLUMNS, 'inflight-table')
        self.table.add_slot('body-cell-cancel', CANCEL_SLOT)
        self.table.on('cancel', lambda e: self.cancel(e.args['id']))
        self.empty = empty('Nothing in flight').mark('inflight-empty')
        self.redraw()
        live(system, ['requests'], self.redraw, every_ms=300)
        ui.timer(1.0, self.tick)

    def tick(self) -> None:
        if self.table.rows:
            self.redraw()

    def redraw(self) -> None:
        rows = [inflight_row(r) for r in self.activity.inflight()]
        self.table.rows = rows
        self.box.set_visibility(bool(rows))
        self.empty.set_visibility(not rows)

    def cancel(self, request_id: str) -> None:
        client = context.client
        if self.activity.cancel(request_id):
            notify(client, f'Cancelled {request_id}', type='positive')
        else:
            notify(client, f'{request_id} is no longer cancellable (finished or not started)', type='warning')
        self.redraw()


class History:
    """Finished requests from SQLite, one page at a time, with the filters the REST list takes."""

    def __init__(self, system: System) -> None:
        self.activity: Activity = system.proxy.activity
        self.offset = 0
        self.records: dict[str, dict[str, Any]] = {}  # this page's rows as recorded, for the details dialog
        self.generation = 0  # a reload's result is shown only if no newer reload started meanwhile
        with ui.row().classes('gap-2 items-end flex-wrap w-full'):
            self.model = self._select({'': 'Any model'}, '', 'Model', 'activity-filter-model')
            self.status = self._select(STATUSES, '', 'Status', 'activity-filter-status')
            self.route = self._select({'': 'Any route'}, '', 'Route', 'activity-filter-route')
            self.node = self._select(NODES, '', 'Served by', 'activity-filter-node')
            self.range = self._select(RANGES, 0, 'Time', 'activity-filter-range')
            ui.space()
            for fmt in ('csv', 'json'):
                button = ui.button(fmt.upper(), icon='download', on_click=functools.partial(self.export, fmt))
                button.props('outline').mark(f'activity-export-{fmt}')
        self.box, self.table = _scrolling_table(HISTORY_COLUMNS, 'activity-table')
        self.table.add_slot('body-cell-status', STATUS_SLOT)
        self.table.on('rowClick', lambda e: self.details(e.args[1]['id']))
        self.table.classes('cursor-pointer')
        self.empty = empty('No requests yet').mark('activity-empty')
        with ui.row().classes('items-center gap-2'):
            self.prev = ui.button(icon='chevron_left', on_click=lambda: self.turn(-1)).props('flat dense')
            self.prev.mark('activity-prev').props('aria-label="Newer requests"')
            self.position = ui.label().mark('activity-position')
            self.next = ui.button(icon='chevron_right', on_click=lambda: self.turn(1)).props('flat dense')
            self.next.mark('activity-next').props('aria-label="Older requests"')
            self.size = ui.select(PAGE_SIZES, value=50, on_change=self.refilter).props('dense')
            self.size.mark('activity-page-size')
        with ui.dialog() as self.dialog, ui.card().classes('min-w-[320px]'):
            self.card = ui.column().classes('gap-1').mark('activity-details')
            ui.button('Close', on_click=self.dialog.close).props('flat')
        live(system, ['requests'], self.follow, every_ms=1000)

    def _select(self, options: dict[Any, str], value: Any, label: str, marker: str) -> ui.select:
        select = ui.select(options, value=value, label=label, on_change=self.refilter)
        return select.classes('min-w-[150px]').mark(marker)

    def filters(self) -> dict[str, Any]:
        seconds = self.range.value
        return {
            'model': self.model.value or None,
            'status': self.status.value or None,
            'route': self.route.value or None,
            'upstream': self.node.value or None,
            'since': time.time() - seconds if seconds else None,
        }

    async def follow(self) -> None:
        if self.offset == 0:  # new requests only move the first page; an older page a user reads stays still
            await self.reload()

    async def refilter(self) -> None:
        self.offset = 0
        await self.reload()

    async def turn(self, pages: int) -> None:
        self.offset = max(0, self.offset + pages * self.size.value)
        await self.reload()

    async def reload(self) -> None:
        self.generation += 1
        mine, filters, offset, size = self.generation, self.filters(), self.offset, self.size.value
        (rows, total), facets = await asyncio.to_thread(self._read, filters, offset, size)
        if mine != self.generation or self.table.is_deleted:
            return
        if not rows and offset > 0 and total > 0:  # the history shrank under this page: show its last page
            self.offset = (total - 1) // size * size
            await self.reload()
            return
        self.records = {r['id']: r for r in rows}
        self.table.rows = [history_row(r) for r in rows]
        self.box.set_visibility(bool(rows))
        filtered = any(filters.values())
        self.empty.set_text('No requests match these filters' if filtered else 'No requests yet')
        self.empty.set_visibility(not rows)
        self.position.set_text(f'{offset + 1}–{offset + len(rows)} of {total}' if rows else f'0 of {total}')
        self.prev.set_enabled(offset > 0)
        self.next.set_enabled(offset + len(rows) < total)
        self._offer(self.model, {'': 'Any model'}, facets['model'])
        self._offer(self.route, {'': 'Any route'}, facets['route'])
        self._offer(self.node, NODES, facets['upstream'])
        self._offer(self.status, STATUSES, [str(s) for s in facets['status']], STATUS_LABELS)

    def _read(self, filters: dict[str, Any], offset: int, size: int) -> Any:
        return self.activity.query(**filters, offset=offset, limit=size), self.activity.facets()

    @staticmethod
    def _offer(select: ui.select, base: dict[str, str], seen: list[str], labels: dict[str, str] | None = None) -> None:
        """Filter choices: what the history holds (shown by `labels` where one has a name), plus the current
        choice even if it was trimmed away."""
        options = {**base, **{v: (labels or {}).get(v, v) for v in seen}}
        options.setdefault(select.value, str(select.value))
        if options != select.options:
            select.set_options(options, value=select.value)

    def details(self, request_id: str) -> None:
        r = self.records.get(request_id)
        if r is None:
            return
        self.card.clear()
        with self.card:
            ui.label(f'{r.get("method") or ""} {r.get("route") or ""}').classes('text-lg font-medium')
            fact('Request', r['id'])
            fact('Time', clock(r.get('ts'), date=True))
            fact('Model', r.get('model') or DASH)
            fact('Status', status_text(r.get('status')))
            fact('Client', r.get('client') or DASH)
            fact('Stream', 'yes' if r.get('stream') else 'no')
            fact('Time to first token', ms(r.get('ttft_s')))
            fact('Duration', ms(r.get('duration_s')))
            fact('Prompt tokens', count(r.get('prompt_tokens')))
            fact('Cached prompt tokens', count(r.get('cached_tokens')))
            fact('Completion tokens', count(r.get('completion_tokens')))
            fact('Prompt tok/s', rate(r.get('prompt_tps')))
            fact('Generation tok/s', rate(r.get('gen_tps')))
            if r.get('error'):
                fact('Error', r['error'])
        self.dialog.open()

    async def export(self, fmt: str) -> None:
        client = context.client
        try:
            data = await asyncio.to_thread(self.activity.export, fmt, **self.filters())
        except Exception as e:
            notify(client, f'Export failed: {e}', type='negative')
            return
        with client:
            name = f'requests-{time.strftime("%Y%m%d-%H%M%S")}.{fmt}'
            ui.download(data, name, 'text/csv' if fmt == 'csv' else 'application/json')


def register(system: System) -> None:
    @page(system, '/activity', 'Activity')
    async def activity() -> None:
        ui.label('In flight').classes('text-lg font-medium')
        Inflight(system)
        ui.label('History').classes('text-lg font-medium mt-4')
        history = History(system)
        await history.reload()
