"""Get models: search Hugging Face (or the configured mirror) for GGUF repos, open one to see its files by
quantization with sizes and a fit estimate, download one; the jobs below show live progress and can be cancelled.
Every figure comes from core (`HubService`, `DownloadManager`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nicegui import context, ui

from core.hub import HubError
from ui.format import DASH, human_bytes
from ui.layout import empty, live, notify, page

if TYPE_CHECKING:
    from nicegui import Client

    from core.system import System

FIT_LABELS = {'fits': ('fits', 'positive'), 'too_big': ('too big', 'negative'), 'unknown': ('unknown', 'grey')}


def fit_badge(fit: dict[str, Any] | None) -> tuple[str, str]:
    """A variant's fit as shown: its label and colour (the library's labels, or the size-only ones)."""
    if not fit:
        return DASH, 'grey'
    label = str(fit.get('label') or 'unknown')
    text, color = FIT_LABELS.get(label, (label.replace('_', ' '), 'primary'))
    if fit.get('source') == 'size':
        text += ' (by size)'
    return text, color


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    minutes, s = divmod(int(seconds), 60)
    return f'{minutes} min {s:02d} s' if minutes else f'{s} s'


class SearchPanel:
    def __init__(self, system: System, client: Client) -> None:
        self.system, self.client = system, client
        with ui.row().classes('w-full items-center gap-2'):
            self.query = (
                ui.input('Search Hugging Face for GGUF models', placeholder='e.g. qwen 7b instruct')
                .props('clearable outlined dense')
                .classes('grow')
                .mark('hub-query')
            )
            self.query.on('keydown.enter', self.search)
            ui.button('Search', icon='search', on_click=self.search).mark('hub-search')
        ui.label(f'From {system.hub.endpoint()}').classes('text-xs lap-muted')
        self.results = ui.column().classes('w-full gap-1')
        self.repo = ui.column().classes('w-full gap-2')

    async def search(self) -> None:
        self.results.clear()
        try:
            repos = await self.system.hub.search(self.query.value or '')
        except HubError as e:
            notify(self.client, e.message, type='negative')
            return
        with self.results:
            if not repos:
                empty('No GGUF repos match.')
            for r in repos:
                with ui.row().classes('w-full items-center gap-3 cursor-pointer').mark('hub-result') as row:
                    ui.label(r['repo']).classes('font-medium')
                    updated = f' · updated {r["updated"][:10]}' if r['updated'] else ''
                    stats = f'{r["downloads"] or 0:,} downloads · {r["likes"] or 0} likes{updated}'
                    ui.label(stats).classes('text-sm lap-muted')
                    if r['gated']:
                        ui.badge('gated', color='warning')
                row.on('click', lambda _e, repo=r['repo']: self.open(repo))

    async def open(self, repo_id: str) -> None:
        self.repo.clear()
        with self.repo:
            ui.spinner()
        try:
            repo = await self.system.hub.repo(repo_id)
        except HubError as e:
            self.repo.clear()
            notify(self.client, e.message, type='negative')
            return
        self.repo.clear()
        with self.repo, ui.card().classes('w-full').mark('hub-repo'):
            ui.label(repo_id).classes('text-lg font-semibold')
            has_mmproj = any(v['mmproj'] for v in repo['variants'])
            with_mmproj = ui.checkbox('Also the vision projector (mmproj)').mark('hub-mmproj') if has_mmproj else None
            models = [v for v in repo['variants'] if not v['mmproj']]
            if not models:
                empty('This repo has no GGUF model files.')
            for v in models:
                text, color = fit_badge(v['fit'])
                with ui.row().classes('w-full items-center gap-3').mark('hub-variant'):
                    ui.label(v['quant'] or v['name']).classes('font-mono w-28')
                    ui.label(human_bytes(v['size'])).classes('w-24 text-right')
                    if v['parts'] > 1:
                        ui.label(f'{v["parts"]} parts' + ('' if v['complete'] else ', some missing')).classes(
                            'text-sm lap-muted'
                        )
                    ui.badge(text, color=color).tooltip('Memory fit on this machine, before downloading')
                    ui.space()
                    ui.button(
                        'Download',
                        icon='download',
                        on_click=lambda _e, name=v['name']: self.download(repo_id, name, with_mmproj),
                    ).props('flat dense').mark('hub-download')

    async def download(self, repo_id: str, name: str, with_mmproj: Any) -> None:
        try:
            job = await self.system.downloads.add(repo_id, name, mmproj=bool(with_mmproj and with_mmproj.value))
        except HubError as e:
            notify(self.client, e.message, type='negative')
            return
        notify(self.client, f'Downloading {job.variant} into {job.target}', type='info')


class JobList:
    """The download jobs, as their events come (at most twice a second). Progress is updated in place; the cards
    are rebuilt only when a job comes, goes or changes state, so a click on Pause is not lost to a redraw."""

    def __init__(self, system: System, client: Client) -> None:
        self.system, self.client = system, client
        self.box = ui.column().classes('w-full gap-2').mark('download-jobs')
        self._shape: list[tuple[str, str]] | None = None  # what the cards show; None: nothing drawn yet
        self._progress: dict[str, tuple[ui.linear_progress, ui.label]] = {}
        self.draw()
        live(system, ['downloads'], self.draw, every_ms=500)

    def draw(self) -> None:
        jobs = self.system.downloads.list()
        shape = [(j['id'], j['state']) for j in jobs]
        if shape == self._shape:
            for j in jobs:
                bar, text = self._progress[j['id']]
                bar.set_value(_fraction(j))
                text.set_text(_progress_text(j))
            return
        self._shape = shape
        self._progress = {}
        self.box.clear()
        with self.box:
            if not jobs:
                empty('No downloads yet.')
            for j in jobs:
                with ui.card().classes('w-full gap-1').mark('download-job'):
                    with ui.row().classes('w-full items-center gap-2'):
                        ui.label(f'{j["repo"]} · {j["variant"]}').classes('font-medium break-all')
                        ui.space()
                        ui.badge(j['state'], color=_state_color(j['state'])).mark('download-state')
                        self._buttons(j)
                    bar = ui.linear_progress(value=_fraction(j), show_value=False)
                    text = ui.label(_progress_text(j)).classes('text-sm lap-muted')
                    self._progress[j['id']] = (bar, text)
                    if j['error']:
                        ui.label(j['error']).classes('text-sm text-negative break-all')
                    if j['state'] == 'done':
                        ui.label(f'In {j["target"]}: it is in the Models list').classes('text-sm')

    def _buttons(self, j: dict[str, Any]) -> None:
        downloads, job_id, state = self.system.downloads, j['id'], j['state']
        if state in ('queued', 'downloading'):
            ui.button(icon='pause', on_click=lambda: downloads.pause(job_id)).props('flat dense round').tooltip(
                'Pause (the partial file is kept)'
            ).mark('download-pause')
        if state in ('paused', 'failed'):
            ui.button(icon='play_arrow', on_click=lambda: downloads.resume(job_id)).props('flat dense round').tooltip(
                'Go on from the bytes it has'
            ).mark('download-resume')
        if state in ('queued', 'downloading', 'paused', 'failed'):
            ui.button(icon='close', on_click=lambda: self.cancel(job_id)).props('flat dense round').tooltip(
                'Cancel and remove the partial file'
            )

    async def cancel(self, job_id: str) -> None:
        await self.system.downloads.cancel(job_id)
        notify(self.client, 'Download cancelled', type='info')


def _fraction(j: dict[str, Any]) -> float:
    return j['bytes_done'] / j['total'] if j['total'] else 0.0


def _progress_text(j: dict[str, Any]) -> str:
    speed = human_bytes(j['speed_bps']) + '/s' if j['speed_bps'] else DASH
    return f'{human_bytes(j["bytes_done"])} of {human_bytes(j["total"] or 0)} · {speed} · ETA {eta_text(j["eta_s"])}'


def _state_color(state: str) -> str:
    colors = {'done': 'positive', 'failed': 'negative', 'downloading': 'primary', 'paused': 'warning'}
    return colors.get(state, 'grey')


def register(system: System) -> None:
    @page(system, '/downloads', 'Get models')
    async def downloads() -> None:
        client = context.client
        ui.label('Find a model').classes('text-lg font-medium')
        SearchPanel(system, client)
        ui.label('Downloads').classes('text-lg font-medium mt-4')
        JobList(system, client)
