"""experiments/test_curve.py: the cost of a run continued from another run's checkpoint counts the run it continues."""

import importlib.util

import pytest

from enfpde.config import REPOSITORY_ROOT


def _script():
    spec = importlib.util.spec_from_file_location("test_curve_script", REPOSITORY_ROOT / "experiments" / "test_curve.py")
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
