"""The ``e2b/chart`` and ``e2b/data`` formatters, run inside each Python kernel (not imported by
the agent).

The agent reads this file's source and runs it in the kernel as module ``_cube_charts``,
then calls :func:`install`. Matplotlib figures get an ``e2b/chart`` MIME entry with the
data the figure shows: line, scatter, bar and pie charts, and a ``superchart`` for a
figure with several charted axes. Anything else is reported as ``unknown``. The
formatter never raises (IPython would print the traceback into the cell's stderr),
and matplotlib is only touched once a figure is displayed.
"""

from __future__ import annotations

from typing import Any


def _num(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _axis_info(ax: Any, which: str) -> dict[str, Any]:
    axis = ax.xaxis if which == "x" else ax.yaxis
    ticks = [_num(t) for t in (ax.get_xticks() if which == "x" else ax.get_yticks())]
    labels = ax.get_xticklabels() if which == "x" else ax.get_yticklabels()
    return {
        f"{which}_label": axis.get_label().get_text() or None,
        f"{which}_unit": None,
        f"{which}_ticks": ticks,
        f"{which}_tick_labels": [t.get_text() for t in labels],
        f"{which}_scale": ax.get_xscale() if which == "x" else ax.get_yscale(),
    }


def _is_date_axis(ax: Any, which: str) -> bool:
    try:
        import matplotlib.dates as mdates

        axis = ax.xaxis if which == "x" else ax.yaxis
        return isinstance(axis.get_converter() if hasattr(axis, "get_converter")
                          else axis.converter, mdates.DateConverter | mdates.ConciseDateConverter)
    except Exception:
        return False


def _coord(value: Any, is_date: bool) -> Any:
    if is_date:
        try:
            import matplotlib.dates as mdates

            return mdates.num2date(float(value)).isoformat()
        except Exception:
            return _num(value)
    return _num(value)


def _label(artist: Any) -> str:
    label = artist.get_label()
    return "" if label is None else str(label)


def _pie(ax: Any) -> dict[str, Any] | None:
    from matplotlib.patches import Wedge

    wedges = [p for p in ax.patches if isinstance(p, Wedge)]
    if not wedges:
        return None
    texts = [t.get_text() for t in ax.texts]
    elements = []
    for i, w in enumerate(wedges):
        label = _label(w)
        if (not label or label.startswith("_")) and i < len(texts):
            label = texts[i]
        elements.append({"label": label, "angle": float(w.theta2 - w.theta1),
                         "radius": float(w.r)})
    return {"type": "pie", "title": ax.get_title() or None, "elements": elements}


def _bar(ax: Any) -> dict[str, Any] | None:
    from matplotlib.container import BarContainer

    containers = [c for c in ax.containers if isinstance(c, BarContainer)]
    if not containers:
        return None
    ticks = ax.get_xticks()
    tick_labels = [t.get_text() for t in ax.get_xticklabels()]
    elements = []
    for c in containers:
        group = _label(c)
        for rect in c.patches:
            center = rect.get_x() + rect.get_width() / 2
            label = str(_num(center))
            for tick, text in zip(ticks, tick_labels, strict=False):
                if abs(float(tick) - center) < max(rect.get_width() / 2, 1e-9) and text:
                    label = text
                    break
            elements.append({"label": label, "group": group, "value": float(rect.get_height())})
    chart = {"type": "bar", "title": ax.get_title() or None, "elements": elements}
    chart.update({k: v for k, v in _axis_info(ax, "x").items() if k in ("x_label", "x_unit")})
    chart.update({k: v for k, v in _axis_info(ax, "y").items() if k in ("y_label", "y_unit")})
    return chart


def _points(ax: Any) -> dict[str, Any] | None:
    from matplotlib.collections import PathCollection

    x_date, y_date = _is_date_axis(ax, "x"), _is_date_axis(ax, "y")
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 0]
    scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
    if lines:
        kind = "line"
        elements = [
            {"label": _label(ln),
             "points": [[_coord(x, x_date), _coord(y, y_date)]
                        for x, y in zip(ln.get_xdata(), ln.get_ydata(), strict=False)]}
            for ln in lines
        ]
    elif scatters:
        kind = "scatter"
        elements = [
            {"label": _label(c),
             "points": [[_coord(x, x_date), _coord(y, y_date)] for x, y in c.get_offsets()]}
            for c in scatters
        ]
    else:
        return None
    chart: dict[str, Any] = {"type": kind, "title": ax.get_title() or None, "elements": elements}
    chart.update(_axis_info(ax, "x"))
    chart.update(_axis_info(ax, "y"))
    if x_date:
        chart["x_scale"] = "datetime"
    if y_date:
        chart["y_scale"] = "datetime"
    return chart


def axes_chart(ax: Any) -> dict[str, Any] | None:
    for extract in (_pie, _bar, _points):
        chart = extract(ax)
        if chart is not None:
            return chart
    return None


def figure_to_chart(fig: Any) -> dict[str, Any] | None:
    try:
        charts = []
        for ax in fig.get_axes():
            if not ax.get_visible() or ax.get_label() == "<colorbar>":
                continue
            chart = axes_chart(ax)
            charts.append(chart or {"type": "unknown", "title": ax.get_title() or None,
                                    "elements": []})
        if not charts:
            return None
        if len(charts) == 1:
            return charts[0]
        suptitle = getattr(fig, "_suptitle", None)
        return {"type": "superchart",
                "title": suptitle.get_text() if suptitle is not None else None,
                "elements": charts}
    except Exception:
        return None


def dataframe_to_data(df: Any) -> dict[str, Any] | None:
    """A pandas DataFrame as upstream's ``e2b/data``: ``df.to_dict(orient="list")`` (column name
    -> list of values), made JSON-safe (names and values that JSON lacks become strings)."""
    import json
    import math

    def cell(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None  # NaN, inf: JSON has no such numbers
        return value

    try:
        columns = df.to_dict(orient="list")
        safe = {str(k): [cell(v) for v in values] for k, values in columns.items()}
        data: dict[str, Any] = json.loads(json.dumps(safe, default=str, allow_nan=False))
        return data
    except Exception:
        return None


def install(ip: Any) -> None:
    """Register the ``e2b/chart`` and ``e2b/data`` formatters on the IPython shell ``ip``."""
    if ip is None:
        return
    from IPython.core.formatters import BaseFormatter
    from traitlets import ObjectName, Unicode

    class ChartFormatter(BaseFormatter):  # type: ignore[misc]
        """Matched by class name, not ``for_type``: IPython's inline-backend setup
        pops every formatter's Figure printer when it (re)configures."""

        format_type = Unicode("e2b/chart")  # type: ignore[no-untyped-call]
        print_method = ObjectName("_repr_e2b_chart_")  # type: ignore[no-untyped-call]
        _return_type = (dict,)

        def __call__(self, obj: Any) -> dict[str, Any] | None:
            if not self.enabled:
                return None
            for cls in type(obj).__mro__:
                if cls.__name__ == "Figure" and cls.__module__ == "matplotlib.figure":
                    return figure_to_chart(obj)
            return None

    class DataFormatter(BaseFormatter):  # type: ignore[misc]
        """DataFrames by class name: pandas is only imported by the user's code."""

        format_type = Unicode("e2b/data")  # type: ignore[no-untyped-call]
        print_method = ObjectName("_repr_e2b_data_")  # type: ignore[no-untyped-call]
        _return_type = (dict,)

        def __call__(self, obj: Any) -> dict[str, Any] | None:
            if not self.enabled:
                return None
            for cls in type(obj).__mro__:
                if cls.__name__ == "DataFrame" and cls.__module__.startswith("pandas."):
                    return dataframe_to_data(obj)
            return None

    ip.display_formatter.formatters["e2b/chart"] = ChartFormatter(parent=ip.display_formatter)
    ip.display_formatter.formatters["e2b/data"] = DataFormatter(parent=ip.display_formatter)
    active = ip.display_formatter.active_types
    for mime in ("e2b/chart", "e2b/data"):
        if active is not None and mime not in active:
            active.append(mime)
