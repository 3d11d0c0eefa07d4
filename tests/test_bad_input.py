"""Bad input to `Forecaster.forecast` / `predict` and `enfpde forecast`: a clear error of the package, raised
before anything is written, one line and exit code 2 on the command line; never a raw traceback, garbage
output or a half-written file."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import xarray as xr
from flax import nnx

from enfpde import checkpointing
from enfpde.cli import main as cli_main
from enfpde.experiment import check_output_path
from enfpde.forecaster import Forecaster, NonFiniteForecastError

TIMES = [0.0, 0.5, 1.0, 3.0]  # the shapes test_forecast_api compiles


def _points(d):
    return d.isel(time=0).stack(point=("y", "x")).reset_index("point")


# -- the xarray interface ------------------------------------------------------------------------------------
XARRAY_CASES = {
    "mask on a dimension the field lacks": (lambda d: d.assign(mask=xr.DataArray(np.ones(3, bool), dims="other")), ValueError, r"'mask' has dimension\(s\) \['other'\]"),
    "zero trajectories": (lambda d: d.isel(trajectory=slice(0, 0)), ValueError, "0 trajectories"),
    "string field": (lambda d: d.assign(u=d.u.astype(str)), TypeError, "variable 'u': expected real numbers"),
    "complex field": (lambda d: d.assign(u=d.u + 1j), TypeError, "variable 'u': expected real numbers, found dtype complex"),
    "string coordinate": (lambda d: d.assign_coords(x=[str(v) for v in d.x.values]), TypeError, "coordinate 'x': expected real numbers"),
    "datetime coordinate": (lambda d: d.assign_coords(x=np.datetime64("2020-01-01") + np.arange(d.x.size).astype("timedelta64[D]")), TypeError, "coordinate 'x'"),
    "missing coordinate variable": (lambda d: d.drop_vars("x"), ValueError, "dimension 'x' has no coordinate variable"),
    "duplicate grid coordinates": (lambda d: d.assign_coords(x=np.zeros(d.x.size)), ValueError, "grid coordinate 'x' has duplicate values"),
    "duplicate scattered points": (lambda d: _points(d).isel(point=[0, 1, 1, 2]), ValueError, "appear more than once"),
    "mask given as a coordinate, all False": (lambda d: d.assign_coords(mask=xr.zeros_like(d.u.isel(trajectory=0, time=0, drop=True), dtype=bool)), ValueError, "no observed point"),
    "integer mask": (lambda d: d.assign(mask=xr.ones_like(d.u, dtype=int)), ValueError, "'mask' must be boolean"),
    "no points": (lambda d: d.isel(x=slice(0, 0)), ValueError, "no points"),
}


@pytest.mark.parametrize("case", list(XARRAY_CASES))
def test_malformed_initial_states(forecaster, initial, case):
    change, error, message = XARRAY_CASES[case]
    with pytest.raises(error, match=message):
        forecaster.forecast(change(initial), [0.0])


def test_a_mask_given_as_a_coordinate_is_used(forecaster, initial):
    observed = xr.ones_like(initial.u.isel(trajectory=0, time=0, drop=True), dtype=bool)
    observed[::2, :] = False
    as_variable = forecaster.forecast(initial.assign(mask=observed), TIMES)
    as_coordinate = forecaster.forecast(initial.assign_coords(mask=observed), TIMES)
    np.testing.assert_allclose(as_coordinate.u.values, as_variable.u.values, rtol=1e-6)
    assert not np.allclose(as_variable.u.values, forecaster.forecast(initial, TIMES).u.values)


@pytest.mark.parametrize(
    "times, error, message",
    [
        (None, TypeError, "found None"),
        ([[0.0, 1.0], [2.0, 3.0]], ValueError, r"found shape \(2, 2\)"),
        (np.array(["2020-01-01", "2020-01-02"], dtype="datetime64[D]"), TypeError, "datetime64.*convert"),
        (np.array([0, 1], dtype="timedelta64[h]"), TypeError, "timedelta64"),
        (["0", "1"], TypeError, "expected real numbers"),
        ([0.0, 1j], TypeError, "expected real numbers"),
        ([0.0, np.nan], ValueError, "finite|increasing"),
        ([0.0, 1e6], ValueError, r"needs 1000000 solver steps.*max_steps = 4096"),
        ([0.0, 4097.0], ValueError, r"needs 4097 solver steps"),
    ],
)
def test_bad_times(forecaster, initial, times, error, message):
    with pytest.raises(error, match=message):
        forecaster.forecast(initial, times)


def test_the_step_budget_is_an_option(forecaster, initial):
    with pytest.raises(ValueError, match=r"needs 3 solver steps .* max_steps = 2"):
        forecaster.forecast(initial, TIMES, max_steps=2)
    with pytest.raises(ValueError, match="max_steps must be a positive integer"):
        forecaster.forecast(initial, TIMES, max_steps=0)
    out = forecaster.forecast(initial, TIMES, max_steps=3)
    np.testing.assert_allclose(out.u.values, forecaster.forecast(initial, TIMES).u.values, rtol=1e-6)


@pytest.mark.parametrize(
    "at, error, message",
    [
        ({"y": np.array([]), "x": np.arange(4) / 4}, ValueError, "coordinate 'y' is empty"),
        (xr.Dataset(coords={"y": ("point", [0.1, 0.2]), "x": ("other", [0.3, 0.4])}), ValueError, "found dimensions"),
        ({"y": np.array([0.1, 0.1]), "x": np.arange(4) / 4}, ValueError, "grid coordinate 'y' has duplicate values"),
        ({"y": np.array(["a", "b"]), "x": np.arange(4) / 4}, TypeError, "'at' coordinate 'y': expected real numbers"),
        ({"y": np.array([0.1, np.nan]), "x": np.arange(4) / 4}, ValueError, "non-finite"),
        (xr.Dataset(coords={"y": ("point", [0.1, 0.1]), "x": ("point", [0.3, 0.3])}), ValueError, "more than once"),
        ({"y": np.arange(4) / 4}, KeyError, r"lacks coordinate\(s\) \['x'\]"),
        ([0.1, 0.2], TypeError, "'at' must be None"),
    ],
)
def test_bad_output_locations(forecaster, initial, at, error, message):
    with pytest.raises(error, match=message):
        forecaster.forecast(initial, [0.0], at=at)


def test_inputs_far_outside_the_training_data_are_refused(forecaster, initial):
    huge = initial.assign(u=initial.u.where(initial.trajectory != 1, initial.u * 1e20))
    with pytest.raises(ValueError, match=r"initial state\(s\) \[1\] reach [\d.]+e\+\d\d standard deviations"):
        forecaster.forecast(huge, TIMES)


def test_a_non_finite_forecast_is_an_error_that_says_where(tiny_run, initial):
    """Dynamics blown up by a factor 1e30 overflow in the first solver step (and the solver's interpolation
    carries that to lead time 0): the error names the states and the first lead time that went non-finite."""
    model = Forecaster.load(tiny_run, batch_size=2)
    field, encoder, dynamics = model.modules
    graphdef, params, rest = nnx.split(dynamics, nnx.Param, ...)
    nnx.update(dynamics, jax.tree.map(lambda p: p * 1e30, params))
    broken = Forecaster(model.config, model.metadata, field, encoder, dynamics, batch_size=2)
    with pytest.raises(NonFiniteForecastError, match=r"non-finite for 3 of 3 initial state\(s\) \(indices \[0, 1, 2\]\), from lead time\(s\) \[0.0, 0.0, 0.0\].*model itself diverged"):
        broken.forecast(initial, TIMES)


# -- the command line ------------------------------------------------------------------------------------------
def _forecast(tiny_run, input_path, output, *extra):
    return cli_main(["forecast", str(tiny_run), str(input_path), "-o", str(output), *extra])


def _no_output(directory, target):
    assert not os.path.exists(target)
    assert not [p for p in os.listdir(directory) if p.endswith(".tmp")], os.listdir(directory)


def _one_line(err):
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _truncated_netcdf(tiny_data, path):
    data = (tiny_data / "test.nc").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _real_grib(tiny_data, path):
    """A real GRIB1 message (eccodes' sample), as a raw ERA5 download would be, for a model not trained on ERA5."""
    eccodes = pytest.importorskip("eccodes", reason="GRIB needs the 'grib' extra (cfgrib, eccodes)")
    message = eccodes.codes_grib_new_from_samples("regular_ll_sfc_grib1")
    path = path.with_suffix(".grib")
    with open(path, "wb") as target:
        eccodes.codes_write(message, target)
    eccodes.codes_release(message)
    return path


UNREADABLE = {
    "a real GRIB file": (_real_grib, "cannot read"),
    "empty": (lambda d, p: (p.write_bytes(b""), p)[1], "is empty"),
    "text": (lambda d, p: (p.write_text("time,u\n0,1\n"), p)[1], "cannot read"),
    "truncated netCDF": (_truncated_netcdf, "cannot read|damaged"),
    "random bytes named .grib": (lambda d, p: (p.with_suffix(".grib").write_bytes(os.urandom(2048)), p.with_suffix(".grib"))[1], "cannot read"),
    "a directory that is not a zarr store": (lambda d, p: (p.mkdir(), p)[1], "not a zarr store"),
}


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_unreadable_input_files(tiny_run, tiny_data, tmp_path, capsys, case):
    make, message = UNREADABLE[case]
    bad = make(tiny_data, tmp_path / "input.nc")
    target = tmp_path / "out" / "forecast.nc"
    assert _forecast(tiny_run, bad, target, "--times", "0,1") == 2
    line = _one_line(capsys.readouterr().err)
    assert str(bad) in line and __import__("re").search(message, line), line
    _no_output(tmp_path, target)
    # The same file given as the output grid.
    assert _forecast(tiny_run, tiny_data / "test.nc", target, "--times", "0,1", "--at", str(bad)) == 2
    assert str(bad) in _one_line(capsys.readouterr().err)
    _no_output(tmp_path, target)


def test_output_paths_that_cannot_be_written(tiny_run, tiny_data, tmp_path, capsys):
    source = tiny_data / "test.nc"
    directory = tmp_path / "a_directory"
    directory.mkdir()
    assert _forecast(tiny_run, source, directory, "--times", "0,1", "--overwrite") == 2
    assert "is a directory" in _one_line(capsys.readouterr().err)
    assert os.listdir(directory) == [] and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    a_file = tmp_path / "afile"
    a_file.write_text("mine")
    assert _forecast(tiny_run, source, a_file / "out.nc", "--times", "0,1") == 2
    assert f"'{a_file}' is a file, not a directory" in _one_line(capsys.readouterr().err)
    assert a_file.read_text() == "mine"


def test_an_unwritable_directory_is_refused_before_any_work(tmp_path, monkeypatch):
    # As root (CI) permissions do not bind, so the permission check itself is exercised through os.access.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match=r"no write permission in"):
        check_output_path(tmp_path / "sub" / "out.nc", overwrite=False, flag="--overwrite")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_an_unwritable_directory_on_the_command_line(tiny_run, tiny_data, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert _forecast(tiny_run, tiny_data / "test.nc", locked / "out.nc", "--times", "0,1") == 2
        assert "no write permission" in _one_line(capsys.readouterr().err)
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize(
    "times, extra, message",
    [
        ("0,4097", (), r"needs 4097 solver steps.*--max-steps"),
        ("0:1000000:1000", (), "needs 1000000 solver steps"),
        ("0,3", ("--max-steps", "2"), r"max_steps = 2"),
        ("-1,0,1", (), ">= 0"),
        ("1,0", (), "strictly increasing"),
    ],
)
def test_bad_lead_times_on_the_command_line(tiny_run, tiny_data, tmp_path, capsys, times, extra, message):
    target = tmp_path / "out.nc"
    assert _forecast(tiny_run, tiny_data / "test.nc", target, "--times", times, *extra) == 2
    assert __import__("re").search(message, _one_line(capsys.readouterr().err))
    _no_output(tmp_path, target)


def test_bad_max_steps_is_an_argument_error(tiny_run, tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _forecast(tiny_run, tiny_data / "test.nc", tmp_path / "o.nc", "--times", "0", "--max-steps", "0")
    assert exit_info.value.code == 2 and "expected a positive integer" in capsys.readouterr().err


def test_a_forecast_too_large_for_memory_is_refused_up_front(tiny_run, tiny_data, tmp_path, capsys):
    target = tmp_path / "huge.nc"
    assert _forecast(tiny_run, tiny_data / "test.nc", target, "--times", "0,1", "--resolution", "100000x100000") == 2
    line = _one_line(capsys.readouterr().err)
    assert "MemoryError" in line and "GiB" in line and "coarser resolution" in line
    _no_output(tmp_path, target)


def test_inputs_far_outside_the_training_data_write_nothing(tiny_run, tiny_data, tmp_path, capsys):
    huge = tmp_path / "huge_values.nc"
    with xr.open_dataset(tiny_data / "test.nc") as ds:
        (ds * 1e20).assign_coords(ds.coords).to_netcdf(huge)
    target = tmp_path / "out.nc"
    assert _forecast(tiny_run, huge, target, "--times", "0,0.5,1,3") == 2
    assert "standard deviations" in _one_line(capsys.readouterr().err)
    _no_output(tmp_path, target)


def test_damaged_run_metadata_names_the_file(tiny_run, tiny_data, tmp_path, capsys):
    run = shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("eval*"))
    text = (run / "model.json").read_text()
    (run / "model.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"model.json' is not valid JSON"):
        checkpointing.read_model_metadata(run)
    assert _forecast(run, tiny_data / "test.nc", tmp_path / "o.nc", "--times", "0") == 2
    assert "model.json' is not valid JSON" in _one_line(capsys.readouterr().err)
    (run / "model.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="does not describe a model"):
        Forecaster.load(run)
    (run / "model.json").write_text(text)
    (run / "config.yaml").write_text("model: {num_latents: [unclosed\n")
    assert _forecast(run, tiny_data / "test.nc", tmp_path / "o.nc", "--times", "0") == 2
    assert "config.yaml" in _one_line(capsys.readouterr().err)


def test_debug_shows_the_traceback(tiny_run, tiny_data, tmp_path, capsys, monkeypatch):
    args = ["forecast", str(tiny_run), str(tmp_path / "absent.nc"), "-o", str(tmp_path / "o.nc"), "--times", "0"]
    assert cli_main(["--debug", *args]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("ENFPDE_DEBUG", "1")
    assert cli_main(args) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("ENFPDE_DEBUG", "0")
    assert cli_main(args) == 2
    assert "Traceback" not in capsys.readouterr().err


# -- damaged checkpoints ---------------------------------------------------------------------------------------
def _damage(checkpoint_dir):
    """Cut every data file of a checkpoint's model and train items to half its size."""
    for path in checkpoint_dir.rglob("*"):
        if path.is_file() and path.parent.name == "d":
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])


def _leaves(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model.modules))]


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("eval*"))
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    _damage(run / "checkpoints" / str(steps[-1]))
    with pytest.warns(UserWarning, match=rf"skipped the damaged checkpoint at step {steps[-1]} .*loaded step {steps[-2]}"):
        model = Forecaster.load(run)
    assert model.step == steps[-2]
    for x, y in zip(_leaves(model), _leaves(Forecaster.load(tiny_run, step=steps[-2]))):
        np.testing.assert_array_equal(x, y)
    for step in steps[:-1]:
        _damage(run / "checkpoints" / str(step))
    with pytest.raises(checkpointing.CheckpointError, match=rf"no checkpoint of .* restores: step {steps[-1]}: .*; step {steps[-2]}: "):
        Forecaster.load(run)


def test_resume_skips_a_damaged_latest_checkpoint_and_keeps_it(tiny_run, tiny_config, tmp_path, capsys):
    """The resumed run continues from the previous checkpoint and ends where the uninterrupted run ended; the
    damaged checkpoint is moved aside, not deleted."""
    from enfpde.trainer import Trainer

    run = shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("eval*"))
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    _damage(run / "checkpoints" / str(steps[-1]))
    Trainer(tiny_config, run, resume=True, progress=False).run()
    assert f"skipped the damaged checkpoint at step {steps[-1]}" in capsys.readouterr().err
    assert (run / "checkpoints" / f"damaged-{steps[-1]}").is_dir()
    for x, y in zip(_leaves(Forecaster.load(run)), _leaves(Forecaster.load(tiny_run))):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_damaged_checkpoints_on_the_command_line(tiny_run, tiny_data, tmp_path, capfd):
    """A damaged latest checkpoint: the forecast is made from the previous one, with a warning and none of the
    reader threads' tracebacks; every checkpoint damaged: one line, exit code 2, nothing written."""
    run = shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("eval*"))
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    _damage(run / "checkpoints" / str(steps[-1]))
    capfd.readouterr()
    with pytest.warns(UserWarning, match=f"skipped the damaged checkpoint at step {steps[-1]}"):
        assert _forecast(run, tiny_data / "test.nc", tmp_path / "ok.nc", "--times", "0,0.5,1,3") == 0
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err, err
    for step in steps[:-1]:
        _damage(run / "checkpoints" / str(step))
    target = tmp_path / "never.nc"
    assert _forecast(run, tiny_data / "test.nc", target, "--times", "0,1") == 2
    assert "no checkpoint of" in _one_line(capfd.readouterr().err)
    _no_output(tmp_path, target)
