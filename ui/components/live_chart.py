"""A plotly time-series chart that grows by `extendTraces` deltas: one small message per sample, no full redraw."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from nicegui import ui

MAX_POINTS = 3600  # an hour at 1 Hz in the browser


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts).isoformat(timespec='milliseconds')


class LiveChart:
    """Traces are added on first sight of a series key; `label(key)` names them in the legend."""

    def __init__(
        self,
        title: str,
        y_title: str,
        label: Callable[[str], str] = str,
        y_range: Sequence[float] | None = None,
        marker: str | None = None,
    ):
        self.label = label
        self.keys: list[str] = []
        layout: dict[str, Any] = {
            'title': {'text': title, 'font': {'size': 14}},
            'margin': {'l': 50, 'r': 10, 't': 36, 'b': 30},
            'height': 260,
            'xaxis': {'type': 'date'},
            'yaxis': {'title': {'text': y_title}, 'rangemode': 'tozero'},
            'legend': {'orientation': 'h', 'y': -0.2},
        }
        if y_range is not None:
            layout['yaxis']['range'] = list(y_range)
        self.plot = ui.plotly({'data': [], 'layout': layout, 'config': {'displaylogo': False}}).classes('w-full')
        if marker:
            self.plot.mark(marker)

    def seed(self, series: dict[str, list[list[float]]]) -> None:
        """Initial history (from the metrics service), drawn once with the page."""
        for key, points in series.items():
            self.keys.append(key)
            self.plot.figure['data'].append(
                {
                    'type': 'scattergl',
                    'mode': 'lines',
                    'name': self.label(key),
                    'x': [_iso(p[0]) for p in points[-MAX_POINTS:]],
                    'y': [p[1] for p in points[-MAX_POINTS:]],
                }
            )
        self.plot.update()

    def extend(self, ts: float, values: dict[str, float]) -> None:
        new = [k for k in values if k not in self.keys]
        for key in new:
            self.keys.append(key)
            trace = {'type': 'scattergl', 'mode': 'lines', 'name': self.label(key), 'x': [], 'y': []}
            self.plot.figure['data'].append(trace)  # so a redraw after reconnect keeps it
            self.plot.run_plot_method('addTraces', trace)
        indices = [self.keys.index(k) for k in values]
        if indices:
            x = _iso(ts)
            self.plot.run_plot_method(
                'extendTraces', {'x': [[x] for _ in indices], 'y': [[values[k]] for k in values]}, indices, MAX_POINTS
            )
