"""Workflows: evaluating a run (tables, figures) and the train command."""

import json
import shutil
from pathlib import Path

import pytest

from enfpde.cli import main as cli_main
from enfpde.experiment import evaluate_run



def test_evaluate_run_writes_tables_and_figures_once(tiny_run, tmp_path):
    tiny_run = Path(shutil.copytree(tiny_run, tmp_path / "run"))  # the shared run stays as it was
    report = evaluate_run(tiny_run, progress=False)
    text = report.read_text()
    assert "| standard |" in text and "| sparse 5 % |" in text and "| shifted |" in text and "persistence" in text
    results = json.loads((tiny_run / "eval" / "test" / "metrics.json").read_text())
    standard = results["settings"]["standard"]
    assert len(standard["model"]["per_frame"]) == 6 and standard["persistence"]["per_frame"][0] == 0.0
    assert results["checkpoint_step"] == 8
    assert json.loads((tiny_run / "eval" / "train" / "metrics.json").read_text())["dataset"]["num_trajectories"] == 4
    for name in ("forecast_vs_truth.png", "rollout.gif", "mse_per_lead_time.png"):
        assert (tiny_run / "eval" / name).stat().st_size > 1000
    before = report.read_text()
    with pytest.raises(FileExistsError, match="--overwrite"):
        evaluate_run(tiny_run, progress=False)
    assert report.read_text() == before


def test_the_train_split_can_be_evaluated_on_its_first_trajectories(forecaster, tiny_config):
    import dataclasses

    from enfpde.config import ConfigError
    from enfpde.experiment import evaluate_protocol

    def config(**changes):
        return dataclasses.replace(
            tiny_config, eval=dataclasses.replace(tiny_config.eval, sparse_fractions=[], shift=False, **changes)
        )

    results = evaluate_protocol(forecaster, config(train_trajectories=2), name="ENF", horizon_time=4.0, progress=False)
    assert results["train"]["dataset"]["num_trajectories"] == 2
    with pytest.raises(ConfigError, match="eval.train_trajectories must be >= 1 or null, found 0"):
        evaluate_protocol(forecaster, config(train_trajectories=0), name="ENF", horizon_time=4.0, progress=False)


def test_train_command_reports_config_errors(tmp_path, capsys):
    assert cli_main(["train", "--run-dir", str(tmp_path / "r"), "train.stage1.epochs=oops"]) == 2
    assert "invalid configuration" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_time_lists_on_the_command_line():
    import argparse

    import numpy as np

    from enfpde.cli import _parse_times

    np.testing.assert_allclose(_parse_times("0:2:0.5"), [0, 0.5, 1, 1.5, 2])
    np.testing.assert_allclose(_parse_times("0,1,5"), [0, 1, 5])
    with pytest.raises(argparse.ArgumentTypeError, match="start:stop:step"):
        _parse_times("0:2:-1")
