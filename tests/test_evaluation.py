"""The evaluation harness and plots, on analytic travelling waves where every number is known in closed form."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from enfpde.data.trajectories import TrajectoryDataset
from enfpde.evaluation import (
    Persistence,
    evaluate,
    latitude_weights,
    mse_per_frame,
    periodic_shifts,
    sparse_observation_masks,
    split_mse,
    write_report,
)
from enfpde.plotting import animate_rollout, grid_extent, grid_frames, plot_forecast_vs_truth, plot_mse_per_lead_time, plot_training_loss

SPEED = 0.1  # cycles per time unit
HORIZON = 3.0
AMPLITUDES = np.array([[1.0, 0.5], [2.0, 1.0], [0.5, 1.5]])  # [N, C]
PHASES = np.array([0.1, 0.45, 0.8])


def _torus_phase(coords):
    return coords[:, 0] + coords[:, 1]  # s = y + x, in cycles


def _torus_envelope(coords):
    return np.ones(len(coords))


def _sphere_phase(coords):
    return coords[:, 1] / 360.0  # s = longitude / 360 degrees


def _sphere_envelope(coords):
    return np.cos(np.deg2rad(coords[:, 0]))


def _wave(coords, times, phase, envelope):
    """``[N, T, M, C]``: channel c of trajectory i is A_ic g(x) sin(2 pi (s(x) - c t) - phi_i + c pi/2)."""
    s = phase(coords)[None, None, :, None]
    g = envelope(coords)[None, None, :, None]
    t = np.asarray(times)[None, :, None, None]
    shift = PHASES[:, None, None, None] - np.pi / 2 * np.arange(AMPLITUDES.shape[1])
    return (AMPLITUDES[:, None, None, :] * g * np.sin(2 * np.pi * (s - SPEED * t) - shift)).astype(np.float32)


def _torus_dataset(times, n=16):
    axis = np.arange(n) / n
    mesh = np.meshgrid(axis, axis, indexing="ij")
    coords = np.stack([m.reshape(-1) for m in mesh], -1)
    return TrajectoryDataset(
        values=_wave(coords, times, _torus_phase, _torus_envelope),
        coords=coords.astype(np.float32),
        times=np.asarray(times, np.float64),
        variables=("u", "v"),
        units=("m", "m"),
        axes=("y", "x"),
        grid_shape=(n, n),
        axis_values=(axis, axis),
    )


def _sphere_dataset(times, lat=np.array([-60.0, -20.0, 20.0, 60.0]), lon=np.arange(0.0, 360.0, 30.0)):
    mesh = np.meshgrid(lat, lon, indexing="ij")
    coords = np.stack([m.reshape(-1) for m in mesh], -1)
    return TrajectoryDataset(
        values=_wave(coords, times, _sphere_phase, _sphere_envelope),
        coords=coords.astype(np.float32),
        times=np.asarray(times, np.float64),
        variables=("h", "u"),
        units=("m", "m s-1"),
        axes=("latitude", "longitude"),
        grid_shape=(len(lat), len(lon)),
        axis_values=(lat, lon),
    )


COARSE = np.arange(6.0)  # t_in: 0, 1, 2; t_out: 3, 4, 5
FINE = np.arange(21) * 0.25


@dataclasses.dataclass
class ExactWave:
    """Solves the travelling wave from any observed initial state: a least-squares fit of the two
    quadratures at the observed points, advected exactly. Records the initial states it was given."""

    phase: object
    envelope: object
    seen: list = dataclasses.field(default_factory=list)

    def predict(self, coords, initial_values, times, query_coords):
        self.seen.append(np.array(initial_values))
        s, g = self.phase(coords.astype(np.float64)), self.envelope(coords.astype(np.float64))
        basis = np.stack([g * np.sin(2 * np.pi * s), g * np.cos(2 * np.pi * s)], -1)  # [M, 2]
        sq, gq = self.phase(query_coords.astype(np.float64)), self.envelope(query_coords.astype(np.float64))
        out = np.empty((initial_values.shape[0], len(times), len(query_coords), initial_values.shape[2]))
        for b, frame in enumerate(np.asarray(initial_values, np.float64)):
            seen = np.all(np.isfinite(frame), -1)
            ab, *_ = np.linalg.lstsq(basis[seen], frame[seen], rcond=None)  # [2, C]
            arg = 2 * np.pi * (sq[None, :] - SPEED * np.asarray(times)[:, None])  # [T, Q]
            out[b] = gq[None, :, None] * (np.sin(arg)[..., None] * ab[0] + np.cos(arg)[..., None] * ab[1])
        return out


@dataclasses.dataclass
class Replay:
    """Returns a fixed dataset's trajectories whatever the initial state (right only for unchanged ones)."""

    dataset: TrajectoryDataset
    calls: int = 0

    def predict(self, coords, initial_values, times, query_coords):
        match = [int(np.argmin(np.nanmean((self.dataset.values[:, 0] - v) ** 2, axis=(1, 2)))) for v in initial_values]
        self.calls += 1
        return self.dataset.values[match][:, : len(times)]


def _persistence_wave_mse(times):
    """Mean over points of (f(s - c t) - f(s))^2 for f = A sin(2 pi s + .) on a full-period grid is
    A^2 (1 - cos 2 pi c t); averaged over channels and trajectories."""
    return np.mean(AMPLITUDES**2) * (1.0 - np.cos(2 * np.pi * SPEED * np.asarray(times)))


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------


def test_split_mse_counts_frame_zero_in_t_in():
    out = split_mse([1.0, 2.0, 3.0, 4.0, 6.0], [0.0, 1.0, 2.0, 3.0, 4.0], horizon_time=2.0)
    assert out == {"t_in": 1.5, "t_out": pytest.approx(13.0 / 3.0)}
    # A frame a rounding error below the horizon belongs to t_out; with no frame beyond, t_out is None.
    assert split_mse([1.0, 3.0], [0.0, 2.0 - 1e-9], 2.0) == {"t_in": 1.0, "t_out": 3.0}
    assert split_mse([1.0, 3.0], [0.0, 1.0], 10.0) == {"t_in": 2.0, "t_out": None}


def test_mse_per_frame_by_hand_missing_truth_and_weights():
    truth = np.zeros((2, 2, 3, 1))
    pred = np.ones((2, 2, 3, 1))
    pred[0, 1] = 3.0
    pred[1, :, 2] = 5.0
    truth[1, 0, 0] = np.nan  # not observed: left out
    # trajectory 0: frames [1, 9]; trajectory 1: frame 0 (1 + 25) / 2 = 13, frame 1 (1 + 1 + 25) / 3 = 9
    np.testing.assert_allclose(mse_per_frame(pred, truth), [(1 + 13) / 2, (9 + 9) / 2])
    np.testing.assert_allclose(mse_per_frame(pred, truth, mask=np.array([True, True, False])), [1.0, (9 + 1) / 2])
    w = np.array([0.5, 0.5, 2.0])
    np.testing.assert_allclose(mse_per_frame(pred[1:], truth[1:], weights=w)[1], (0.5 + 0.5 + 50) / 3)
    bad = pred.copy()
    bad[0, 0, 0] = np.nan
    assert np.isnan(mse_per_frame(bad, truth)[0])


def test_latitude_weights_cosine_mean_one():
    ds = _sphere_dataset(COARSE)
    w = latitude_weights(ds)
    assert w.mean() == pytest.approx(1.0)
    lat = ds.coords[:, 0]
    np.testing.assert_allclose(w[lat == 60.0] / w[lat == 20.0], np.cos(np.deg2rad(60)) / np.cos(np.deg2rad(20)), rtol=1e-6)
    with pytest.raises(ValueError, match="'latitude' axis"):
        latitude_weights(_torus_dataset(COARSE, n=4))


# ---------------------------------------------------------------------------------------------------------
# Persistence and the protocol transforms
# ---------------------------------------------------------------------------------------------------------


def test_persistence_nearest_observed_point_wraps_periodic_axes():
    coords = np.array([[0.0, 0.0], [0.3, 0.0], [0.85, 0.0]])
    values = np.array([[[1.0], [2.0], [np.nan]]])
    query = np.array([[0.95, 0.0], [0.2, 0.0], [0.3, 0.0]])
    periodic = Persistence(periods=(1.0, 0.0)).predict(coords, values, np.array([0.0, 1.0]), query)
    assert periodic.shape == (1, 2, 3, 1)
    np.testing.assert_array_equal(periodic[0, 1, :, 0], [1.0, 2.0, 2.0])  # 0.95 is 0.05 from 0.0 across the wrap
    flat = Persistence().predict(coords, values, np.array([0.0]), query)
    np.testing.assert_array_equal(flat[0, 0, :, 0], [2.0, 2.0, 2.0])
    sphere = Persistence(on_sphere=True).predict(
        np.array([[0.0, 0.0], [0.0, 170.0]]), np.array([[[1.0], [2.0]]]), np.array([0.0]), np.array([[0.0, -175.0]])
    )
    assert sphere[0, 0, 0, 0] == 2.0  # -175 is 15 degrees from 170 the other way round
    with pytest.raises(ValueError, match="no observed point"):
        Persistence().predict(coords, np.full((1, 3, 1), np.nan), np.array([0.0]), query)


def test_sparse_masks_observe_the_requested_fraction():
    ds = _torus_dataset(COARSE)
    for fraction in (0.5, 0.05):
        masks = sparse_observation_masks(ds, fraction, seed=3)
        np.testing.assert_array_equal(masks.sum(axis=1), round(fraction * 256))
        np.testing.assert_array_equal(masks, sparse_observation_masks(ds, fraction, seed=3))
    assert not np.array_equal(sparse_observation_masks(ds, 0.5, seed=3), sparse_observation_masks(ds, 0.5, seed=4))
    # The model is handed exactly those points, NaN elsewhere.
    model = ExactWave(_torus_phase, _torus_envelope)
    evaluate(model, ds, horizon_time=HORIZON, sparse_fractions=(0.05,), shift=False, seed=3, progress=False)
    given = model.seen[-1]
    np.testing.assert_array_equal(np.all(np.isfinite(given), -1), sparse_observation_masks(ds, 0.05, seed=3))


# ---------------------------------------------------------------------------------------------------------
# The protocols, end to end
# ---------------------------------------------------------------------------------------------------------


def test_exact_forecaster_scores_zero_everywhere_and_persistence_matches_hand_computation():
    ds, fine = _torus_dataset(COARSE), _torus_dataset(FINE)
    res = evaluate(
        ExactWave(_torus_phase, _torus_envelope), ds, horizon_time=HORIZON, fine=fine, periodic_axes=("y", "x"),
        batch_size=2, progress=False,
    )
    expected_keys = ["standard", "dtau_1", "dtau_0.5", "dtau_0.25", "sparse_50%", "sparse_5%", "shifted"]
    assert list(res["settings"]) == expected_keys
    json.dumps(res)
    for key, entry in res["settings"].items():
        assert entry["model"]["t_in"] < 1e-10 and entry["model"]["t_out"] < 1e-10, key
        assert max(entry["model"]["per_frame"]) < 1e-10, key
    np.testing.assert_allclose(res["settings"]["dtau_0.5"]["times"], np.arange(11) * 0.5)
    np.testing.assert_allclose(res["settings"]["dtau_0.25"]["times"], FINE)
    # Persistence on complete grids (standard, every dtau, shifted): the closed form.
    for key in ("standard", "dtau_1", "dtau_0.5", "dtau_0.25", "shifted"):
        entry = res["settings"][key]
        hand = _persistence_wave_mse(entry["times"])
        np.testing.assert_allclose(entry["persistence"]["per_frame"], hand, rtol=1e-5, atol=1e-6)
        times = np.asarray(entry["times"])
        assert entry["persistence"]["t_in"] == pytest.approx(hand[times < HORIZON].mean(), rel=1e-5)
        assert entry["persistence"]["t_out"] == pytest.approx(hand[times >= HORIZON].mean(), rel=1e-5)
    assert res["settings"]["standard"]["persistence"]["per_frame"][0] == 0.0
    # Sparse persistence fills from the nearest observed point: worse than the exact frame 0.
    assert res["settings"]["sparse_5%"]["persistence"]["per_frame"][0] > 0.1
    assert res["settings"]["sparse_5%"]["observed_points"] == [13, 13, 13]


def test_shifted_protocol_rolls_the_truth_and_is_independent_of_batching():
    ds = _torus_dataset(COARSE)
    kwargs = dict(horizon_time=HORIZON, sparse_fractions=(), periodic_axes=("y", "x"), progress=False)
    replay = evaluate(Replay(ds), ds, **kwargs)
    assert replay["settings"]["standard"]["model"]["t_out"] == 0.0
    assert replay["settings"]["shifted"]["model"]["t_in"] > 0.1  # the truth was rolled: replaying fails
    shifts = np.asarray(replay["settings"]["shifted"]["shifts_cells"])
    np.testing.assert_array_equal(shifts, periodic_shifts(ds, ("y", "x"), seed=0))
    assert shifts.shape == (3, 2) and np.all((shifts >= 1) & (shifts < 16))
    a = evaluate(ExactWave(_torus_phase, _torus_envelope), ds, batch_size=1, **kwargs)
    b = evaluate(ExactWave(_torus_phase, _torus_envelope), ds, batch_size=3, **kwargs)
    for key in a["settings"]:
        np.testing.assert_allclose(a["settings"][key]["persistence"]["per_frame"], b["settings"][key]["persistence"]["per_frame"])
    with pytest.raises(ValueError, match="periodic_axes"):
        evaluate(Replay(ds), ds, horizon_time=HORIZON, progress=False)


def test_sphere_latitude_weighted_and_longitude_shift():
    ds = _sphere_dataset(COARSE)
    res = evaluate(
        ExactWave(_sphere_phase, _sphere_envelope), ds, horizon_time=HORIZON, latitude_weighted=True,
        sparse_fractions=(0.5,), progress=False,
    )
    assert res["protocol"]["periodic_axes"] == ["longitude"]
    for key, entry in res["settings"].items():
        assert entry["model"]["lat_weighted"]["t_out"] < 1e-10, key
    # Persistence, weighted by hand: the error at a point scales as cos^2(lat), times the weight cos(lat).
    w, g2 = latitude_weights(ds), _sphere_envelope(ds.coords.astype(np.float64)) ** 2
    hand_plain = np.mean(g2) * _persistence_wave_mse(COARSE)
    hand_weighted = np.mean(w * g2) * _persistence_wave_mse(COARSE)
    standard = res["settings"]["standard"]["persistence"]
    np.testing.assert_allclose(standard["per_frame"], hand_plain, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(standard["lat_weighted"]["per_frame"], hand_weighted, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(res["settings"]["shifted"]["persistence"]["lat_weighted"]["per_frame"], hand_weighted, rtol=1e-5, atol=1e-7)
    for amplitudes, variable in zip(AMPLITUDES.T, ds.variables):  # each variable on its own, weighted
        hand = np.mean(w * g2) * np.mean(amplitudes**2) * (1.0 - np.cos(2 * np.pi * SPEED * COARSE))
        got = standard["per_variable"][variable]["lat_weighted_per_frame"]
        np.testing.assert_allclose(got, hand, rtol=1e-5, atol=1e-7)


def test_zero_shot_super_resolution_queries_the_native_grid():
    coarse = _sphere_dataset(COARSE)
    native = _sphere_dataset(COARSE, lat=np.linspace(-70.0, 70.0, 8), lon=np.arange(0.0, 360.0, 15.0))
    res = evaluate(
        ExactWave(_sphere_phase, _sphere_envelope), coarse, horizon_time=HORIZON, native=native,
        latitude_weighted=True, sparse_fractions=(), shift=False, progress=False,
    )
    zero_shot = res["settings"]["zero_shot"]
    assert zero_shot["label"] == "zero-shot 8x24" and zero_shot["query_points"] == 8 * 24
    assert zero_shot["model"]["t_in"] < 1e-10 and zero_shot["model"]["lat_weighted"]["t_out"] < 1e-10
    # Persistence copies the nearest coarse point onto the native grid: frame 0 is no longer exact there.
    assert res["settings"]["standard"]["persistence"]["per_frame"][0] == 0.0
    assert zero_shot["persistence"]["per_frame"][0] > 1e-2
    with pytest.raises(ValueError, match="same trajectories and frames"):
        evaluate(Replay(coarse), coarse, horizon_time=HORIZON, native=native.select(frames=slice(0, 4)),
                 sparse_fractions=(), shift=False, progress=False)


def test_variable_scales_multiply_each_channel_error():
    ds = _torus_dataset(COARSE, n=8)
    scales = np.array([2.0, 0.5])
    res = evaluate(Persistence(periods=(1.0, 1.0)), ds, horizon_time=HORIZON, periodic_axes=("y", "x"),
                   variable_scales=scales, sparse_fractions=(), shift=False, progress=False)
    hand = np.mean(AMPLITUDES**2 * scales**2) * (1.0 - np.cos(2 * np.pi * SPEED * COARSE))
    np.testing.assert_allclose(res["settings"]["standard"]["model"]["per_frame"], hand, rtol=1e-5, atol=1e-7)
    assert res["protocol"]["variable_scales"] == [2.0, 0.5]
    # Per variable: the file's units, scales not applied.
    per_variable = res["settings"]["standard"]["model"]["per_variable"]
    assert list(per_variable) == list(ds.variables)
    for amplitudes, variable in zip(AMPLITUDES.T, ds.variables):
        hand = np.mean(amplitudes**2) * (1.0 - np.cos(2 * np.pi * SPEED * COARSE))
        np.testing.assert_allclose(per_variable[variable]["plain_per_frame"], hand, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="variable_scales must be 2 positive"):
        evaluate(Replay(ds), ds, horizon_time=HORIZON, variable_scales=[1.0], shift=False, progress=False)


def test_fine_dataset_must_hold_the_same_trajectories():
    ds, fine = _torus_dataset(COARSE), _torus_dataset(FINE)
    other = dataclasses.replace(fine, values=fine.values[::-1].copy())
    with pytest.raises(ValueError, match="frame 0 differs"):
        evaluate(Replay(ds), ds, horizon_time=HORIZON, fine=other, shift=False, sparse_fractions=(), progress=False)


# ---------------------------------------------------------------------------------------------------------
# Reports and plots
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results():
    ds = _torus_dataset(COARSE, n=8)
    return evaluate(Persistence(periods=(1.0, 1.0)), ds, horizon_time=HORIZON, periodic_axes=("y", "x"),
                    fine=_torus_dataset(FINE, n=8), name="persistence-as-model", progress=False)


def test_report_is_written_and_not_overwritten(results, tmp_path):
    json_path, md_path = write_report(results, tmp_path / "run", title="Travelling wave")
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(results))
    md = md_path.read_text()
    assert md.startswith("# Travelling wave")
    for label in ("| standard |", "| dtau 0.5 |", "| dtau 0.25 |", "| sparse 50 % |", "| sparse 5 % |", "| shifted |"):
        assert label in md
    t_out = results["settings"]["shifted"]["persistence"]["t_out"]
    assert f"{t_out:.2e}" in md and "e-0" in md
    assert md.count("| t_in |") == 3 and md.count("| t_out |") == 3  # per-lead-time rows of 6 frames
    with pytest.raises(FileExistsError, match="metrics.json"):
        write_report(results, tmp_path / "run", title="again")
    (tmp_path / "run" / "metrics.json").unlink()
    with pytest.raises(FileExistsError, match="metrics.md"):
        write_report(results, tmp_path / "run", title="again")
    write_report(results, tmp_path / "run", title="again", overwrite=True)
    assert (tmp_path / "run" / "metrics.md").read_text().startswith("# again")


def test_plots_write_images_and_refuse_to_overwrite(results, tmp_path):
    ds = _torus_dataset(COARSE, n=8)
    truth = grid_frames(ds, ds.values[0], channel=1)
    forecast = truth + 0.1 * np.random.default_rng(0).normal(size=truth.shape)
    extent = grid_extent(ds)
    assert extent == pytest.approx((-1 / 16, 1 - 1 / 16, -1 / 16, 1 - 1 / 16))
    png = plot_forecast_vs_truth(truth, forecast, ds.times, tmp_path / "f.png", horizon_time=HORIZON, variable="v",
                                 units="m", extent=extent, axis_labels=("x", "y"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    gif = animate_rollout(truth, forecast, ds.times, tmp_path / "a.gif", fps=4, horizon_time=HORIZON)
    with Image.open(gif) as im:
        assert im.format == "GIF" and im.n_frames == len(ds.times)
    curve = plot_mse_per_lead_time(results, tmp_path / "mse.png")
    assert curve.read_bytes()[:4] == b"\x89PNG"
    plot_mse_per_lead_time({"a": [1e-3, 2e-3], "b": [0.0, 1e-2]}, tmp_path / "lists.png", horizon_time=1.0)
    records = [{"step": i, "stage": "stage1" if i < 30 else "stage2", "loss": 1.0 / (i + 1)} for i in range(50)]
    loss_png = plot_training_loss(records, tmp_path / "loss.png")
    assert loss_png.read_bytes()[:4] == b"\x89PNG" and loss_png.stat().st_size > 1000
    with pytest.raises(ValueError, match="no training records"):
        plot_training_loss([], tmp_path / "none.png")
    for call in (
        lambda: plot_training_loss(records, loss_png),
        lambda: plot_forecast_vs_truth(truth, forecast, ds.times, png),
        lambda: animate_rollout(truth, forecast, ds.times, gif),
        lambda: plot_mse_per_lead_time(results, curve),
    ):
        with pytest.raises(FileExistsError, match="overwrite=True"):
            call()
    plot_forecast_vs_truth(truth, forecast, ds.times, png, frames=[1, 4], overwrite=True)
    assert not list(tmp_path.glob(".*tmp*"))
