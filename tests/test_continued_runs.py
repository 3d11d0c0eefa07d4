"""A run resumed in a new directory from another published run's checkpoint: its test curve
(experiments/test_curve.py) and its published header (experiments/publish_run.py) count the run it continues."""

import importlib.util
import json

import pytest

from enfpde.config import REPOSITORY_ROOT


def _script(name="test_curve", monkeypatch=None):
    if monkeypatch is not None:  # the script imports its sibling scripts
        monkeypatch.syspath_prepend(str(REPOSITORY_ROOT / "experiments"))
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPOSITORY_ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_continued_run_costs_the_base_run_up_to_its_start_plus_its_own():
    base = [{"step": 100, "machine_min": 10.0, "wall_min": 12.0}, {"step": 200, "machine_min": 20.0, "wall_min": 25.0}]
    own = {201: {"stage": "stage2", "machine_min": 0.5, "wall_min": 0.6}, 300: {"stage": "stage2", "machine_min": 4.0, "wall_min": 5.0}}
    shifted = _script().continue_costs(own, base, first_step=200)
    assert shifted[201] == {"stage": "stage2", "machine_min": 20.5, "wall_min": 25.6}
    assert shifted[300]["machine_min"] == pytest.approx(24.0) and shifted[300]["wall_min"] == pytest.approx(30.0)


def test_a_continued_run_needs_the_base_curve_at_the_step_it_started_from():
    base = [{"step": 100, "machine_min": 10.0, "wall_min": 12.0}]
    with pytest.raises(SystemExit, match="no row at step 200"):
        _script().continue_costs({}, base, first_step=200)


def test_a_published_continuation_names_the_run_it_continues_and_the_total_cost(tmp_path, monkeypatch):
    script = _script("publish_run", monkeypatch)
    monkeypatch.setattr(script, "RESULTS", tmp_path)
    (tmp_path / "base_test_curve.json").write_text(json.dumps([{"step": 200, "machine_min": 20.0, "wall_min": 25.0}]))
    (tmp_path / "base.md").write_text("# base\n\n- Machine: Some CPU, 2 cores, no GPU.\n")
    line = script.continued_run("base", 200, wall=600.0, machine=300.0)
    assert "from its step 200: 20.0 machine minutes, 25.0 min wall there (machine: Some CPU, 2 cores, no GPU)" in line
    assert line.endswith("With them: 25.0 machine minutes, 35.0 min wall.")
    with pytest.raises(SystemExit, match="no row at step 100"):
        script.continued_run("base", 100, wall=0.0, machine=0.0)
