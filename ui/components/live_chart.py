"""A plotly time-series chart that grows by `extendTraces` deltas: one small message per sample, no full redraw.

Two browser errors shaped it: a plot method sent before plotly.js has drawn the chart logs "Plotly is not loaded
yet", and a resize of a hidden chart throws. So points that arrive before the browser says the chart is drawn
(`plotly_afterplot`) only go into the figure, which is sent whole once it is; and a chart is never created hidden.
Transparent backgrounds and grey text read in both themes, so the charts follow the page's theme."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from nicegui import ui

MAX_POINTS = 3600  # an hour at 1 Hz in the browser
GRID = 'rgba(128, 128, 128, 0.25)'
NO_DATA = {'text': 'no data yet', 'showarrow': False, 'xref': 'paper', 'yref': 'paper', 'x': 0.5, 'y': 0.5}


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
        *,
        compact: bool = False,
        max_points: int = MAX_POINTS,
    ):
        self.label = label
        self.keys: list[str] = []
        self.max_points = max_points
        self.drawn = False
        self.compact = compact
        axis = {'gridcolor': GRID, 'zerolinecolor': GRID}
        layout: dict[str, Any] = {
            'margin': {'l': 50, 'r': 10, 't': 36, 'b': 30},
            'height': 260,
            'paper_bgcolor': 'rgba(0,0,0,0)',
            'plot_bgcolor': 'rgba(0,0,0,0)',
            'font': {'color': '#888'},
            'xaxis': {'type': 'date', **axis},
            'yaxis': {'title': {'text': y_title}, 'rangemode': 'tozero', **axis},
            'legend': {'orientation': 'h', 'y': -0.2},
            'annotations': [NO_DATA],
        }
        if title:
            layout['title'] = {'text': title, 'font': {'size': 14}}
        if compact:  # a sparkline: the line alone
            layout.update(height=70, margin={'l': 0, 'r': 0, 't': 0, 'b': 0}, showlegend=False)
            layout['xaxis'] = {'type': 'date', 'visible': False}
            layout['yaxis'] = {'visible': False, 'rangemode': 'tozero'}
        if y_range is not None:
            layout['yaxis']['range'] = list(y_range)
        for a in ('xaxis', 'yaxis'):
            layout[a]['visible'] = False  # until there is data
        config = {'displaylogo': False, 'displayModeBar': False, 'staticPlot': compact}
        self.plot = ui.plotly({'data': [], 'layout': layout, 'config': config}).classes('w-full')
        # Once: it fires after every extend, and each would be a message from every browser.
        self.plot.on('plotly_afterplot', self._drawn, [], throttle=86400, trailing_events=False)
        if marker:
            self.plot.mark(marker)

    def _drawn(self) -> None:
        if not self.drawn:
            self.drawn = True
            self.plot.update()  # the points that came while the browser was still drawing

    def seed(self, series: dict[str, list[list[float]]]) -> None:
        """Draw `series` (history from the metrics service) in place of what is shown."""
        self.keys = []
        self.plot.figure['data'] = []
        for key, points in series.items():
            self.keys.append(key)
            self.plot.figure['data'].append(self._trace(key, points[-self.max_points :]))
        self._annotate()
        self.plot.update()

    def _trace(self, key: str, points: list[list[float]]) -> dict[str, Any]:
        return {
            'type': 'scatter',
            'mode': 'lines',
            'name': self.label(key),
            'x': [_iso(p[0]) for p in points],
            'y': [p[1] for p in points],
        }

    def _annotate(self) -> bool:
        """Show "no data yet" while no trace has a point; returns whether that changed."""
        empty = not any(t['x'] for t in self.plot.figure['data'])
        layout = self.plot.figure['layout']
        was_empty = bool(layout.get('annotations'))
        layout['annotations'] = [NO_DATA] if empty else []
        for axis in ('xaxis', 'yaxis'):  # an empty date axis would read "Jan 2000"
            layout[axis]['visible'] = not empty and not self.compact
        return empty != was_empty

    def extend(self, ts: float, values: dict[str, float]) -> None:
        if not values:
            return
        x = _iso(ts)
        new = [k for k in values if k not in self.keys]
        for key in new:
            self.keys.append(key)
            self.plot.figure['data'].append(self._trace(key, []))
        indices = [self.keys.index(k) for k in values]
        for i, key in zip(indices, values, strict=True):  # the server's copy, so a full send keeps every point
            trace = self.plot.figure['data'][i]
            trace['x'].append(x)
            trace['y'].append(values[key])
            if len(trace['x']) > self.max_points:
                del trace['x'][0], trace['y'][0]
        changed = self._annotate()
        if not self.drawn or new or changed:
            if self.drawn:
                self.plot.update()
            return
        self.plot.run_plot_method(
            'extendTraces', {'x': [[x] for _ in indices], 'y': [[values[k]] for k in values]}, indices, self.max_points
        )
