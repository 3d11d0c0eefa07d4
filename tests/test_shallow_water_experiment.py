"""Shallow water through the whole pipeline: generated data -> training -> evaluation (zero-shot 2x,
latitude weights, reference units) -> comparison table, and the end-to-end longitude equivariance of the
forecast. A coarse solver grid (T21, 64 x 32 native, 32 x 16 training) keeps it to seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from enfpde.config import load_config
from enfpde.data import dataset_generator, generate_dataset
from enfpde.data.shallow_water import generate_dataset as generate_shallow_water
from enfpde.data.trajectories import open_dataset
from enfpde.experiment import comparison_markdown, evaluate_run, training_summary
from enfpde.forecaster import Forecaster
from enfpde.geometry import AxialSphere

NUM_LATENTS = 8  # two rings of four: longitude rotations by 90 degrees map the arrangement onto itself
TINY_DATA = {
    "generator": "shallow_water",
    "name": "shallow_water_test",
    "truncation": 21,
    "latitude_nodes": 32,
    "steps_per_snapshot": 25,
    "dropped_snapshots": 2,
    "num_frames": 6,
    "splits": {"train": {"num_trajectories": 4, "seed_mode": "train"}, "test": {"num_trajectories": 2, "seed_mode": "test"}},
    "native_splits": ["test"],
}


def _tiny_overrides(data_dir, geometry):
    return [
        f"name=sw_{geometry}",
        f"data.train={data_dir / 'train.nc'}",
        f"data.test={data_dir / 'test.nc'}",
        f"data.test_native={data_dir / 'test_native.nc'}",
        f"data.geometry={geometry}",
        "data.horizon=4",
        f"model.num_latents={NUM_LATENTS}",
        "model.latent_dim=8",
        "model.num_hidden=16",
        "model.num_frequencies=8",
        "model.dynamics_hidden=16",
        "model.dynamics_frequencies=8",
        "train.batch_size=2",
        "train.num_points=64",
        "train.stage1.epochs=2",
        "train.stage2.epochs=2",
        "train.checkpoint_every=4",
        "eval.batch_size=2",
        "eval.sparse_fractions=[0.5]",
    ]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sw_data")
    generate_shallow_water(TINY_DATA, output_dir=out, progress=False)
    return out


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    from enfpde.trainer import train

    root = tmp_path_factory.mktemp("sw_runs")
    out = {}
    for geometry in ("axial_sphere", "absolute_sphere"):
        config = load_config("shallow_water_quick", _tiny_overrides(data_dir, geometry))
        out[geometry] = train(config, root / geometry, progress=False)
    return out


def test_dataset_yamls_name_their_generator(tmp_path):
    from enfpde.config import REPOSITORY_ROOT

    assert dataset_generator(REPOSITORY_ROOT / "datasets/shallow_water_quick.yaml") == "shallow_water"
    assert dataset_generator(REPOSITORY_ROOT / "datasets/navier_stokes_quick.yaml") == "navier_stokes"
    bad = tmp_path / "bad.yaml"
    bad.write_text("generator: heat_equation\n")
    with pytest.raises(ValueError, match="unknown generator 'heat_equation'"):
        generate_dataset(bad, output_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_evaluation_reports_zero_shot_latitude_weighted_in_reference_units(runs):
    run_dir = runs["axial_sphere"]
    report = evaluate_run(run_dir, progress=False)
    test = json.loads((run_dir / "eval" / "test" / "metrics.json").read_text())
    settings = test["settings"]
    assert list(settings) == ["standard", "sparse_50%", "shifted", "zero_shot"]
    assert settings["zero_shot"]["label"] == "zero-shot 32x64"
    assert test["protocol"]["variable_scales"] == pytest.approx([1 / 6.37122e6, 3600 / 6.37122e6, 3600 / 6.37122e6])
    for entry in settings.values():
        for who in ("model", "persistence"):
            assert np.isfinite(entry[who]["t_in"]) and np.isfinite(entry[who]["lat_weighted"]["t_out"])
    # Persistence at the training resolution reconstructs frame 0 exactly; on the native grid it cannot.
    assert settings["standard"]["persistence"]["per_frame"][0] == 0.0
    assert settings["zero_shot"]["persistence"]["per_frame"][0] > 0.0
    # In the reference's units the winds (m/s x 3600 / R) dominate: the errors are small numbers.
    assert settings["standard"]["persistence"]["t_out"] < 1e-2
    for name in ("forecast_vs_truth.png", "forecast_vs_truth_zero_shot.png", "rollout.gif", "mse_per_lead_time.png"):
        assert (run_dir / "eval" / name).stat().st_size > 1000
    assert "zero-shot 32x64" in report.read_text()


def test_comparison_table_and_training_summary(runs):
    for run_dir in runs.values():
        if not (run_dir / "eval" / "test" / "metrics.json").exists():
            evaluate_run(run_dir, progress=False, figures=False)
    summary = training_summary(runs["axial_sphere"])
    assert summary["epochs"] == {"stage1": 2, "stage2": 2} and summary["steps"] == 8 and summary["wall_s"] > 0
    text = comparison_markdown(
        {"ENF axial": runs["axial_sphere"], "ENF absolute": runs["absolute_sphere"]}, title="t", paper_table="| paper |"
    )
    for row in ("| ENF axial |", "| ENF axial, zero-shot 32x64 |", "| ENF absolute |", "| persistence |",
                "## Latitude-weighted MSE", "| paper |", "stage1 2, stage2 2"):
        assert row in text, row


def _rotation_error(run_dir, data_dir, cells: int) -> float:
    """The largest over variables of the L2 difference between the forecast of an initial state rotated by
    ``cells`` longitude cells and the rotated forecast of the original state, relative to the L2 norm of the
    forecast's variation about its mean (the height's 10 km mean depth would hide errors otherwise)."""
    model = Forecaster.load(run_dir, batch_size=2)
    with open_dataset(data_dir / "test.nc") as ds:
        initial = ds[list(model.variables)].isel(time=[0]).load()
        times = ds["time"].values - ds["time"].values[0]  # lead times of every frame (hours)
    rotated = initial.roll(longitude=cells, roll_coords=False)
    forecast = model.forecast(initial, times)
    of_rotated = model.forecast(rotated, times)
    expected = forecast.roll(longitude=cells, roll_coords=False)
    errors = [
        float(np.linalg.norm(of_rotated[v] - expected[v]) / np.linalg.norm(expected[v] - expected[v].mean()))
        for v in model.variables
    ]
    return max(errors)


def test_forecast_commutes_with_longitude_rotations_of_the_latent_arrangement(runs, data_dir):
    lon = open_dataset(data_dir / "test.nc")["longitude"].values
    step = float(lon[1] - lon[0])
    symmetry = AxialSphere().arrangement_symmetry_deg(NUM_LATENTS)
    cells = int(round(symmetry / step))
    assert cells * step == pytest.approx(symmetry)  # the rotation maps both the grid and the latents to themselves
    assert _rotation_error(runs["axial_sphere"], data_dir, cells) < 1e-4
    # The test can fail: a rotation that moves the latents off their arrangement, or a model without the
    # symmetry, gives errors orders of magnitude larger.
    assert _rotation_error(runs["axial_sphere"], data_dir, 1) > 1e-3
    assert _rotation_error(runs["absolute_sphere"], data_dir, cells) > 1e-3


@pytest.mark.parametrize("preset", ["quick", "paper", "shallow_water_quick", "shallow_water_paper"])
def test_presets_load_and_shallow_water_presets_match_their_data(preset):
    from enfpde.config import REPOSITORY_ROOT
    from enfpde.data.shallow_water import load_config as load_dataset_config

    config = load_config(preset)
    if not preset.startswith("shallow_water"):
        return
    dataset = load_dataset_config(REPOSITORY_ROOT / config.dataset)
    hours_per_frame = dataset.steps_per_snapshot * dataset.solver_dt / 3600.0
    assert config.model.time_unit == pytest.approx(hours_per_frame)
    assert config.data.train.startswith(dataset.output_dir) and config.data.test_native.endswith("test_native.nc")
    radius = 6.37122e6
    assert config.eval.variable_scales == pytest.approx({"height": 1 / radius, "u": 3600 / radius, "v": 3600 / radius})
    # The rotations of the end-to-end test exist for the preset's arrangement on the 3.75 degree grid.
    symmetry = AxialSphere().arrangement_symmetry_deg(config.model.num_latents)
    assert symmetry / 3.75 == pytest.approx(round(symmetry / 3.75))
