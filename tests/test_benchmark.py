"""The benchmark pipeline (enfpde.benchmark, experiments/benchmark.py) end to end on the tiny advection data:
every model trained a handful of steps, saved, evaluated by the shared protocol and timed, one table; and
its error paths. Tiny sizes; the end-to-end run is shared by the tests of this module."""

import importlib.util
import json

import pytest

import enfpde  # noqa: F401  (XLA settings first)

from conftest import TINY_OVERRIDES
from enfpde.benchmark import MODELS, benchmark_configs, load_baseline_preset, load_model, run_benchmark
from enfpde.config import REPOSITORY_ROOT, ConfigError, load_config

BASELINE_OVERRIDES = [
    "fno.model.modes=3", "fno.model.width=8", "fno.model.depth=2", "fno.model.projection_width=16",
    "fno.train.batch_size=2", "fno.train.rollout_steps=2", "fno.steps=3",
    "dino.model.code_dim=8", "dino.model.width=16", "dino.model.num_layers=2", "dino.model.dynamics_width=16",
    "dino.model.dynamics_layers=1", "dino.model.fit_steps=5", "dino.train.batch_size=2", "dino.train.num_points=32",
    "dino.steps=3",
]


def tiny_overrides(tiny_data):
    data = [f"data.{split}={tiny_data / f'{split}.nc'}" for split in ("train", "test")]
    # after TINY_OVERRIDES: these win; the quick preset's short-horizon start made to fit the tiny horizon of 4
    enf = ["train.stage1.epochs=1", "train.stage2.epochs=1", "train.stage2_frames=3", "train.stage2_frames_steps=1"]
    return TINY_OVERRIDES + data + enf + BASELINE_OVERRIDES


@pytest.fixture(scope="module")
def benchmark(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmark")
    table = root / "table.md"
    run_benchmark(
        "ns", "quick", run_root=root / "runs", table=table, overrides=tiny_overrides(tiny_data), progress=False,
        command="pytest", generate_data=False,
    )
    return root, table


def test_table_holds_every_model_with_parameters_and_protocols(benchmark):
    root, table = benchmark
    text, paper = table.read_text().split("## The paper's numbers")
    assert "| ENF, periodic | 1.45e-03 | 9.14e-03 | 1.57e-03 | 1.16e-02 |" in paper
    cost = text.split("## Cost")[1]
    for model, label in (("enf", "ENF"), ("fno", "FNO"), ("dino", "DINo")):
        record = json.loads((root / "runs" / "benchmark_ns_quick" / model / "benchmark.json").read_text())
        assert record["num_parameters"] > 0 and record["train_wall_s"] > 0 and record["inference_s_per_trajectory"] > 0
        assert f"| {label} | {record['num_parameters']:,} | {record['steps']} |" in cost
        assert text.count(f"| {label} |") == 3  # MSE, other protocols, cost
    for heading in ("sparse 50 %", "sparse 5 %", "shifted", "persistence", "Command: `pytest`", "Machine:"):
        assert heading in text, heading


def test_retraining_one_model_keeps_the_finished_rows_of_the_others(benchmark, tiny_data):
    root, table = benchmark
    before = table.read_text()
    run_benchmark(
        "ns", "quick", models=["fno"], run_root=root / "runs", table=table, overrides=tiny_overrides(tiny_data),
        overwrite=True, progress=False, command="pytest fno", generate_data=False,
    )
    after = table.read_text()
    for label in ("ENF", "DINo"):  # not retrained: the same rows as before
        rows = [line for line in before.splitlines() if line.startswith(f"| {label} |")]
        assert rows and all(row in after for row in rows), label
    assert "The rows of ENF, DINo come from the finished runs" in after and "this one trained FNO" in after
    assert after.index("| ENF |") < after.index("| FNO |") < after.index("| DINo |")


@pytest.mark.parametrize("model", MODELS)
def test_saved_models_load_and_offer_the_xarray_forecast(benchmark, tiny_data, model):
    import xarray as xr

    root, _ = benchmark
    forecaster = load_model(model, root / "runs" / "benchmark_ns_quick" / model)
    with xr.open_dataset(tiny_data / "test.nc") as ds:
        out = forecaster.forecast(ds.isel(time=[0]).load(), [0.0, 1.0])
    assert out.u.dims == ("trajectory", "time", "y", "x") and out.u.shape == (3, 2, 8, 8)
    assert (root / "runs" / "benchmark_ns_quick" / model / "eval" / "test" / "metrics.json").exists()


def test_unknown_model_and_existing_table_are_refused_before_training(benchmark, tiny_data, tmp_path):
    _, table = benchmark
    with pytest.raises(ValueError, match=r"unknown model\(s\) \['gnn'\]"):
        run_benchmark("ns", "quick", models=["fno", "gnn"], run_root=tmp_path, table=tmp_path / "t.md")
    with pytest.raises(FileExistsError, match="already exists"):
        run_benchmark("ns", "quick", run_root=tmp_path, table=table, overrides=tiny_overrides(tiny_data))
    assert not (tmp_path / "benchmark_ns_quick").exists()
    with pytest.raises(ValueError, match="unknown dataset 'era5'"):
        run_benchmark("era5", "quick", run_root=tmp_path, table=tmp_path / "t.md")


def test_presets_load_and_reject_unknown_keys(tmp_path):
    for dataset in ("ns", "swe"):
        for preset in ("quick", "paper"):
            config, baselines = benchmark_configs(dataset, preset)
            assert set(baselines) == {"fno", "dino"} and all(b.steps > 0 for b in baselines.values())
            assert not config.train.random_windows  # the ENF learns from the frames the baselines see
    assert load_config("quick").train.random_windows  # although its quick preset takes windows
    assert load_baseline_preset("dino", "ns", "paper").model.code_dim == 100  # REFERENCE section 4
    with pytest.raises(ConfigError, match="bogus"):
        load_baseline_preset("fno", "ns", "quick", ["model.bogus=1"])
    with pytest.raises(ConfigError, match="width must be even"):
        load_baseline_preset("dino", "ns", "quick", ["model.width=15"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {modes: 4}\nepochs: 3\n")
    with pytest.raises(ConfigError, match="epochs"):
        load_baseline_preset("fno", "ns", "quick", path=bad)


def test_command_line_reports_errors(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("benchmark_cli", REPOSITORY_ROOT / "experiments" / "benchmark.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--dataset", "ns", "--models", "gnn", "--run-root", str(tmp_path), "--table", str(tmp_path / "t.md")])
    assert exit_info.value.code == 2 and "unknown model(s) ['gnn']" in capsys.readouterr().err
