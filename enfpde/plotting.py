"""Figures of forecasts: truth / forecast / error panels, rollout animations, MSE per lead time.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no display, no global backend switch),
written atomically (a temporary file, then a rename), and never over an existing file unless
``overwrite=True``. Fields are 2-D grids ``[T, n_rows, n_cols]`` in the order of the dataset's axes,
``(y, x)`` or ``(latitude, longitude)``: rows along the vertical axis, an equirectangular image on the
sphere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.animation import PillowWriter
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from enfpde.data.trajectories import TrajectoryDataset
from enfpde.evaluation import check_writable

__all__ = ["animate_rollout", "grid_extent", "grid_frames", "plot_forecast_vs_truth", "plot_mse_per_lead_time", "plot_training_loss"]

_FIELD_CMAP = "viridis"
_ERROR_CMAP = "RdBu_r"


def grid_frames(dataset: TrajectoryDataset, values: np.ndarray, channel: int = 0) -> np.ndarray:
    """``values [T, M, C]`` on the dataset's grid points -> ``[T, *grid_shape]`` of one channel."""
    if dataset.grid_shape is None:
        raise ValueError("grid_frames needs a grid dataset; this one holds scattered points.")
    values = np.asarray(values)
    if values.ndim != 3 or values.shape[1] != dataset.coords.shape[0]:
        raise ValueError(f"values must be [T, M={dataset.coords.shape[0]}, C], found {values.shape}.")
    return values[..., channel].reshape(values.shape[0], *dataset.grid_shape)


def grid_extent(dataset: TrajectoryDataset) -> tuple[float, float, float, float]:
    """The imshow extent ``(left, right, bottom, top)`` of a 2-D grid: cell edges half a step beyond the
    first and last coordinates; ``bottom`` is the first row's edge (above ``top`` for a descending axis)."""
    if dataset.grid_shape is None or len(dataset.grid_shape) != 2:
        raise ValueError(f"grid_extent needs a 2-D grid, found grid shape {dataset.grid_shape}.")

    def edges(v):
        v = np.asarray(v, np.float64)
        half = 0.5 * (v[1] - v[0]) if v.size > 1 else 0.5
        return float(v[0] - half), float(v[-1] + half)

    (bottom, top), (left, right) = edges(dataset.axis_values[0]), edges(dataset.axis_values[1])
    return left, right, bottom, top


def _new_figure(width: float, height: float, dpi: int) -> Figure:
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _temporary(path: Path) -> Path:
    # Keep the suffix: matplotlib and Pillow pick the format from it.
    return path.with_name(f".{path.stem}.tmp{path.suffix}")


def _save_figure(fig: Figure, path, overwrite: bool, fmt: str) -> Path:
    path = check_writable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    fig.savefig(tmp, format=fmt)
    os.replace(tmp, path)
    return path


def _as_fields(truth, forecast, times) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    truth, forecast, times = np.asarray(truth), np.asarray(forecast), np.asarray(times, np.float64)
    if truth.ndim != 3 or truth.shape != forecast.shape:
        raise ValueError(
            f"truth and forecast must both be [T, n_rows, n_cols] (one channel on a 2-D grid); found "
            f"{truth.shape} and {forecast.shape}. Use grid_frames to reshape [T, M, C] values."
        )
    if times.shape != (truth.shape[0],):
        raise ValueError(f"times must be [T] = [{truth.shape[0]}], found {times.shape}.")
    return truth, forecast, times


def _oriented(extent, *fields):
    """Flip rows when the vertical axis descends, so images are drawn with origin='lower' and north up."""
    if extent is not None and extent[2] > extent[3]:
        extent = (extent[0], extent[1], extent[3], extent[2])
        fields = tuple(f[..., ::-1, :] for f in fields)
    return (extent, *fields)


def _limits(field) -> tuple[float, float]:
    finite = field[np.isfinite(field)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def _error_limit(error) -> float:
    finite = np.abs(error[np.isfinite(error)])
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0


def _default_frames(times: np.ndarray, horizon_time: float | None) -> list[int]:
    last = len(times) - 1
    if horizon_time is not None:
        inside = np.flatnonzero(times - times[0] < horizon_time)
        middle = int(inside[-1]) if inside.size else last // 2
    else:
        middle = last // 2
    return sorted({0, middle, last})


def _quantity(variable: str, units: str) -> str:
    return f"{variable} [{units}]" if units else variable


def plot_forecast_vs_truth(
    truth,
    forecast,
    times,
    path,
    *,
    frames: Sequence[int] | None = None,
    horizon_time: float | None = None,
    variable: str = "",
    units: str = "",
    extent: tuple[float, float, float, float] | None = None,
    axis_labels: tuple[str, str] = ("", ""),
    title: str | None = None,
    dpi: int = 100,
    overwrite: bool = False,
) -> Path:
    """A PNG grid: rows truth, forecast and error (forecast - truth), columns some frames.

    Args:
        truth, forecast: ``[T, n_rows, n_cols]`` one channel (see :func:`grid_frames`); times: ``[T]``.
        path: the PNG to write.
        frames: which frames to show; default frame 0, the last frame inside ``horizon_time`` (or the
            middle one) and the last.
        horizon_time: the training horizon as a lead time, to choose the default frames and mark t_in/t_out.
        variable, units: for the colourbar labels.
        extent: ``(left, right, bottom, top)`` as imshow takes it (see :func:`grid_extent`); a descending
            vertical axis (bottom > top) is drawn flipped, north up.
        axis_labels: (horizontal, vertical) axis labels, e.g. ("longitude", "latitude").

    Truth and forecast share one colour scale (the truth's range, so a forecast out of range saturates);
    the error row has its own symmetric scale. Returns the path; raises FileExistsError if it exists and
    ``overwrite`` is False.
    """
    truth, forecast, times = _as_fields(truth, forecast, times)
    frames = _default_frames(times, horizon_time) if frames is None else [int(f) for f in frames]
    if not frames or min(frames) < -len(times) or max(frames) >= len(times):
        raise ValueError(f"frames must index the {len(times)} frames, found {frames}.")
    error = forecast - truth
    extent, truth, forecast, error = _oriented(extent, truth, forecast, error)
    vmin, vmax = _limits(truth[frames])
    elim = _error_limit(error[frames])
    fig = _new_figure(2.6 * len(frames) + 1.2, 7.2, dpi)
    axes = fig.subplots(3, len(frames), squeeze=False, sharex=True, sharey=True)
    rows = (("truth", truth, _FIELD_CMAP, vmin, vmax), ("forecast", forecast, _FIELD_CMAP, vmin, vmax),
            ("error", error, _ERROR_CMAP, -elim, elim))
    for r, (row_name, field, cmap, lo, hi) in enumerate(rows):
        image = None
        for c, f in enumerate(frames):
            ax = axes[r, c]
            image = ax.imshow(field[f], origin="lower", extent=extent, cmap=cmap, vmin=lo, vmax=hi,
                              aspect="auto", interpolation="nearest")
            lead = times[f] - times[0]
            part = "" if horizon_time is None else (" (t_in)" if lead < horizon_time else " (t_out)")
            ax.set_title(f"{row_name}, t = {times[f]:g}{part}", fontsize=9)
            if r == 2:
                ax.set_xlabel(axis_labels[0])
            if c == 0:
                ax.set_ylabel(axis_labels[1])
        label = _quantity(variable, units) if row_name != "error" else _quantity(f"error {variable}".strip(), units)
        fig.colorbar(image, ax=list(axes[r]), shrink=0.9, label=label)
    if title:
        fig.suptitle(title)
    return _save_figure(fig, path, overwrite, "png")


def animate_rollout(
    truth,
    forecast,
    times,
    path,
    *,
    fps: int = 4,
    horizon_time: float | None = None,
    variable: str = "",
    units: str = "",
    extent: tuple[float, float, float, float] | None = None,
    axis_labels: tuple[str, str] = ("", ""),
    dpi: int = 80,
    overwrite: bool = False,
) -> Path:
    """A GIF of truth, forecast and error side by side, one frame per time step.

    Args as :func:`plot_forecast_vs_truth`; colour scales are fixed over the whole rollout (truth range for
    truth and forecast, symmetric for the error). Returns the path; raises FileExistsError if it exists and
    ``overwrite`` is False.
    """
    truth, forecast, times = _as_fields(truth, forecast, times)
    if fps < 1:
        raise ValueError(f"fps must be >= 1, found {fps}.")
    path = check_writable(path, overwrite)
    if path.suffix.lower() != ".gif":
        raise ValueError(f"animate_rollout writes a GIF; the path must end in .gif, found '{path}'.")
    error = forecast - truth
    extent, truth, forecast, error = _oriented(extent, truth, forecast, error)
    vmin, vmax = _limits(truth)
    elim = _error_limit(error)
    fig = _new_figure(11.0, 3.6, dpi)
    axes = fig.subplots(1, 3, sharex=True, sharey=True)
    specs = (("truth", truth, _FIELD_CMAP, vmin, vmax), ("forecast", forecast, _FIELD_CMAP, vmin, vmax),
             ("error", error, _ERROR_CMAP, -elim, elim))
    images = []
    for ax, (name, field, cmap, lo, hi) in zip(axes, specs):
        image = ax.imshow(field[0], origin="lower", extent=extent, cmap=cmap, vmin=lo, vmax=hi, aspect="auto",
                          interpolation="nearest")
        ax.set_title(name)
        ax.set_xlabel(axis_labels[0])
        label = _quantity(variable, units) if name != "error" else _quantity(f"error {variable}".strip(), units)
        fig.colorbar(image, ax=ax, shrink=0.85, label=label)
        images.append(image)
    axes[0].set_ylabel(axis_labels[1])
    fig.suptitle(f"t = {times[0]:g}")
    # Lay the figure out once and keep it: the constrained layout redone on every frame was half of the GIF's time.
    fig.canvas.draw()
    fig.set_layout_engine("none")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    writer = PillowWriter(fps=fps)
    with writer.saving(fig, str(tmp), dpi):
        for t in range(len(times)):
            for image, (_, field, *_rest) in zip(images, specs):
                image.set_data(field[t])
            lead = times[t] - times[0]
            part = "" if horizon_time is None else (" (t_in)" if lead < horizon_time else " (t_out)")
            fig.suptitle(f"t = {times[t]:g}{part}")
            writer.grab_frame()
    os.replace(tmp, path)
    return path


def plot_mse_per_lead_time(
    results: Mapping,
    path,
    *,
    times: Sequence[float] | None = None,
    horizon_time: float | None = None,
    setting: str = "standard",
    title: str | None = None,
    dpi: int = 100,
    overwrite: bool = False,
) -> Path:
    """A PNG line plot (log y) of the MSE per lead time, model against persistence, horizon marked.

    Args:
        results: either the dict of :func:`enfpde.evaluation.evaluate` (the curves, times and horizon of
            ``setting`` are read from it), or a mapping ``{label: [T] MSE}`` with ``times`` (default
            ``0 .. T-1``) and ``horizon_time`` given here.
        path: the PNG to write. Non-positive values (an exact model) are left off the log axis.

    Returns the path; raises FileExistsError if it exists and ``overwrite`` is False.
    """
    if "settings" in results:
        if setting not in results["settings"]:
            raise ValueError(f"no setting {setting!r} in the results; found {list(results['settings'])}.")
        entry = results["settings"][setting]
        series = {str(results.get("model", "model")): entry["model"]["per_frame"],
                  "persistence": entry["persistence"]["per_frame"]}
        times = entry["times"] if times is None else times
        if horizon_time is None:
            horizon_time = results.get("protocol", {}).get("horizon_time")
        title = f"MSE per lead time ({entry.get('label', setting)})" if title is None else title
    else:
        series = {str(k): v for k, v in results.items()}
    if not series:
        raise ValueError("no curves to plot.")
    lengths = {len(v) for v in series.values()}
    if len(lengths) != 1:
        raise ValueError(f"every curve needs one value per lead time; found lengths {sorted(lengths)}.")
    (length,) = lengths
    times = np.arange(length, dtype=np.float64) if times is None else np.asarray(times, np.float64)
    if times.shape != (length,):
        raise ValueError(f"times must be [{length}], found {times.shape}.")
    fig = _new_figure(6.4, 4.0, dpi)
    ax = fig.subplots()
    styles = {"persistence": dict(color="0.45", linestyle="--", marker=".")}
    for label, values in series.items():
        values = np.array([np.nan if v is None else v for v in values], np.float64)
        values[~(values > 0)] = np.nan
        ax.plot(times, values, label=label, **styles.get(label, dict(marker="o", markersize=3)))
    ax.set_yscale("log")
    if horizon_time is not None:
        ax.axvline(horizon_time, color="k", linewidth=1.0, linestyle=":", label="training horizon")
        ax.axvspan(horizon_time, max(float(times.max()), horizon_time), color="0.9", zorder=0)
    ax.set_xlabel("lead time")
    ax.set_ylabel("MSE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return _save_figure(fig, path, overwrite, "png")



def plot_training_loss(records: Sequence[Mapping], path, *, window: int = 20, dpi: int = 100, overwrite: bool = False) -> Path:
    """A PNG of a run's training loss (log y) against the step, one curve per stage, raw and as a moving mean.

    Args:
        records: the run's metrics (``checkpointing.read_metrics``): dicts with ``step``, ``stage``, ``loss``.
        path: the PNG to write.
        window: steps in the moving mean.

    Returns the path; raises FileExistsError if it exists and ``overwrite`` is False, ValueError without records.
    """
    if not records:
        raise ValueError("no training records to plot.")
    fig = _new_figure(6.4, 4.0, dpi)
    ax = fig.subplots()
    for stage in dict.fromkeys(r["stage"] for r in records):
        steps = np.array([r["step"] for r in records if r["stage"] == stage])
        loss = np.array([r["loss"] for r in records if r["stage"] == stage], np.float64)
        (line,) = ax.plot(steps, loss, alpha=0.25, linewidth=0.8)
        if len(loss) >= window:
            ax.plot(steps[window - 1 :], np.convolve(loss, np.ones(window) / window, mode="valid"), color=line.get_color(),
                    label=f"{stage} (mean of {window})")
        else:
            line.set_label(stage)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (normalised units)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save_figure(fig, path, overwrite, "png")
