"""The models other machines serve (core/remotes), as one table with a machine column and filter: on the Models
page below this machine's own. Load / Unload there is on the Nodes page, one card per machine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nicegui import ui

from ui.format import DASH, human_bytes

if TYPE_CHECKING:
    from core.system import System

STOPPED = ('stopped', 'failed', 'crashed', None)
COLUMNS: list[dict[str, Any]] = [
    {'name': 'id', 'label': 'Model', 'field': 'id', 'align': 'left', 'sortable': True},
    {'name': 'node', 'label': 'Machine', 'field': 'node', 'align': 'left', 'sortable': True},
    {'name': 'status', 'label': 'State there', 'field': 'status', 'align': 'left'},
    {'name': 'fit', 'label': 'Fit there', 'field': 'fit', 'align': 'left'},
    {'name': 'size', 'label': 'Size', 'field': 'size', 'align': 'right'},
]
ANY = ''


def model_row(remote: dict[str, Any], m: dict[str, Any]) -> dict[str, Any]:
    """One remote model as shown: its state there (an OpenAI server serves its models whenever it is up)."""
    node = remote['kind'] == 'node' and remote['state'] == 'up'
    status = m.get('status') if remote['state'] == 'up' else remote['state']
    return {
        'id': m['id'],
        'own_id': m['own_id'],
        'node': remote['name'],
        'status': status or 'serves it',
        'fit': m.get('fit') or DASH,
        'size': human_bytes(m.get('size_bytes')) if m.get('size_bytes') else DASH,
        'can_load': node and status in STOPPED,
        'can_unload': node and status not in STOPPED,
    }


class RemoteModels:
    def __init__(self, system: System) -> None:
        self.system = system
        with ui.column().classes('w-full gap-2').mark('remote-models') as self.box:
            with ui.row().classes('w-full items-end gap-3'):
                ui.label('On other machines').classes('text-lg font-medium')
                self.machine = ui.select({ANY: 'All machines'}, value=ANY, label='Machine', on_change=self.show)
                self.machine.props('dense').classes('w-40').mark('remote-models-machine')
            with ui.element('div').classes('overflow-x-auto w-full'):
                self.table = ui.table(columns=COLUMNS, rows=[], row_key='key').props(
                    'flat bordered dense no-data-label="No models listed (yet)"'
                )
                self.table.classes('w-full').mark('remote-models-table')
        self.show()

    def show(self) -> None:
        remotes = [r.as_dict() for r in self.system.remotes.all()]
        self.box.set_visibility(bool(remotes))
        self.machine.set_options({ANY: 'All machines', **{r['name']: r['name'] for r in remotes}})
        if self.machine.value not in self.machine.options:
            self.machine.value = ANY
        rows = [model_row(r, m) for r in remotes for m in r['models'] if self.machine.value in (ANY, r['name'])]
        self.table.rows = [{**row, 'key': f'{row["node"]}/{row["id"]}'} for row in rows]
