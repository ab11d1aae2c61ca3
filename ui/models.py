"""Models: every GGUF found, searchable, sortable and filtered; what is inside it, whether it fits, its live state
with Load / Unload / Pin and load progress; details with the parameter editor, the command line and the log."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nicegui import context, ui

from core import parameters
from core.settings import ConfigInvalid
from core.supervisor import ModelState, SupervisorError
from ui.components.first_run import FirstRun
from ui.components.model_card import UNUSABLE, ModelCard, shown_state
from ui.components.model_details import ModelDetails
from ui.components.remote_models import RemoteModels
from ui.layout import Working, empty, live, notify, page, subscribe

if TYPE_CHECKING:
    from nicegui import Client

    from core.events import Event
    from core.library import ModelEntry
    from core.library.fit import FitEstimate
    from core.system import System

SORTS = {'name': 'Name', 'size': 'Size', 'params': 'Parameters', 'status': 'Status'}
STATUS_FILTERS = {
    'all': 'Any status',
    'running': 'Running',
    'stopped': 'Stopped',
    'failed': 'Failed',
    'unusable': 'Unusable',
}
FIT_FILTERS = {'all': 'Any fit', 'fits': 'Fits', 'tight': 'Tight', 'does not fit': 'Does not fit'}
STATUS_ORDER: list[str] = [
    ModelState.READY,
    ModelState.STARTING,
    ModelState.RESTARTING,
    ModelState.STOPPING,
    ModelState.FAILED,
]
RUNNING = {ModelState.READY, ModelState.STARTING, ModelState.RESTARTING, ModelState.STOPPING}


def select_models(
    entries: list[ModelEntry],
    states: dict[str, str],
    fits: dict[str, FitEstimate],
    *,
    text: str = '',
    sort: str = 'name',
    status: str = 'all',
    capability: str = 'all',
    fit: str = 'all',
) -> list[ModelEntry]:
    """The models the toolbar asks for, in its order."""
    needle = text.strip().lower()

    def keep(e: ModelEntry) -> bool:
        state = states[e.id]
        if needle and needle not in e.id.lower() and needle not in (e.meta.architecture or '').lower():
            return False
        if status == 'running' and state not in RUNNING:
            return False
        if status in ('stopped', 'failed', UNUSABLE) and state != status:
            return False
        if capability != 'all' and capability not in e.capabilities:
            return False
        return fit == 'all' or (e.id in fits and fits[e.id].label == fit)

    chosen = [e for e in entries if keep(e)]
    keys = {
        'name': lambda e: e.id.lower(),
        'size': lambda e: -e.size_bytes,
        'params': lambda e: -(e.meta.n_params or 0),
        'status': lambda e: (STATUS_ORDER.index(states[e.id]) if states[e.id] in STATUS_ORDER else 99, e.id.lower()),
    }
    return sorted(chosen, key=keys.get(sort, keys['name']))


def register(system: System) -> None:
    async def act(action: str, model_id: str, details: ModelDetails, client: Client) -> None:
        # `client` is the page's, taken when the page was built: the clicked card may be redrawn away before this
        # coroutine even starts (a state event every 100 ms), and `context.client` then has no element to ask.
        try:
            if action == 'details':
                await details.open(model_id)
            elif action == 'load':
                working = Working(client, f'Loading {model_id}…')
                try:
                    await system.scheduler.load(model_id)
                except SupervisorError as e:
                    working.done(f'load {model_id} failed: {e}', type='negative', multi_line=True)
                    return
                except BaseException:
                    working.done(f'{model_id} did not load')
                    raise
                working.done(f'{model_id} is ready', type='positive')
            elif action == 'unload':
                await system.scheduler.unload(model_id)
                notify(client, f'{model_id} stopped')
            elif action in ('pin', 'unpin'):
                own = parameters.model_view(system, model_id)['params']
                await parameters.save_model(system, model_id, {**own, 'pinned': action == 'pin'})
                notify(client, f'{model_id} {"pinned: never evicted" if action == "pin" else "unpinned"}')
        except (SupervisorError, ConfigInvalid) as e:  # the scheduler has logged the details
            notify(client, f'{action} {model_id} failed: {e}', type='negative', multi_line=True, timeout=10000)

    @page(system, '/models', 'Models')
    async def models_page() -> None:
        client = context.client
        FirstRun(system)
        details = ModelDetails(system)
        view: dict[str, Any] = {'text': '', 'sort': 'name', 'status': 'all', 'capability': 'all', 'fit': 'all'}
        cards: dict[str, ModelCard] = {}
        fits: dict[str, FitEstimate] = await system.library.fits()
        capabilities = sorted({c for e in system.library.models() for c in e.capabilities})

        with ui.row().classes('items-end gap-3 w-full flex-wrap'):
            ui.input('Search', on_change=lambda e: set_view('text', e.value or '')).props('clearable dense').classes(
                'w-56'
            ).mark('models-search')
            ui.select(SORTS, value='name', label='Sort by', on_change=lambda e: set_view('sort', e.value)).props(
                'dense'
            ).classes('w-36').mark('models-sort')
            ui.select(STATUS_FILTERS, value='all', on_change=lambda e: set_view('status', e.value)).props(
                'dense'
            ).classes('w-36').mark('models-status')
            ui.select(
                {'all': 'Any capability', **{c: c for c in capabilities}},
                value='all',
                on_change=lambda e: set_view('capability', e.value),
            ).props('dense').classes('w-40').mark('models-capability')
            ui.select(FIT_FILTERS, value='all', on_change=lambda e: set_view('fit', e.value)).props('dense').classes(
                'w-36'
            ).mark('models-fit')
            ui.space()
            ui.button('Rescan', icon='refresh', on_click=lambda: system.library.rescan()).props('outline dense')
            ui.button('Unload all', icon='stop', on_click=lambda: system.scheduler.unload_all()).props('outline dense')
        summary = ui.label().classes('text-sm lap-muted').mark('models-summary')

        def set_view(key: str, value: Any) -> None:
            view[key] = value
            listing.refresh()

        @ui.refreshable
        def listing() -> None:
            found = system.library.models()
            cards.clear()
            if not found:
                dirs = ', '.join(str(d) for d in system.config.settings.models_dirs)
                empty(f'No GGUF models found in {dirs}.' if dirs else 'No model folders yet: add one in Settings.')
                summary.set_text('')
                return
            live_states = {e.id: system.scheduler.describe(e.id) for e in found}
            states = {e.id: shown_state(e, live_states[e.id]) for e in found}
            shown = select_models(found, states, fits, **view)
            running = sum(1 for s in states.values() if s in RUNNING)
            summary.set_text(f'{len(shown)} of {len(found)} models shown · {running} running')
            if not shown:
                empty('No model matches these filters.')
            own = system.config.settings.models
            for entry in shown:
                pinned = bool(own.get(entry.id) and own[entry.id].pinned)
                failure = system.logs.tail(entry.id, 8) if live_states[entry.id].get('error') else []
                cards[entry.id] = ModelCard(
                    entry,
                    live_states[entry.id],
                    fits.get(entry.id),
                    pinned=pinned,
                    failure_log=failure,
                    on_action=lambda a, m: act(a, m, details, client),
                )
            sample = system.metrics.latest
            for card in cards.values():
                card.figures(sample)

        async def redraw() -> None:
            fits.clear()
            fits.update(await system.library.fits())  # free memory read once per redraw, off the loop
            listing.refresh()

        with ui.column().classes('w-full gap-3').mark('models-list'):
            listing()
        elsewhere = RemoteModels(system)
        live(system, ['remotes'], elsewhere.show, every_ms=500)

        def on_sample(event: Event) -> None:
            for mid, card in cards.items():
                card.live = system.scheduler.describe(mid)
                card.figures(event.data)
            details.figures(event.data)
            details.flush()

        # State changes, new files, saved parameters; 100 ms keeps `ready` within 100 ms of the event (ui_load).
        live(system, ['models', 'config'], redraw, every_ms=100)
        subscribe(system, ['metrics'], on_sample)
