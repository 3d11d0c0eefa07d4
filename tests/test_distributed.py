"""Multi-process training and forecasting with jax.distributed, as two local CPU processes (gloo collectives).

Every process is started with ``subprocess`` (tests/distributed_worker.py: ``enfpde train`` through the CLI,
then a forecast) and stopped on a timeout. The reference is one process with two simulated devices: the same
global batch of the same steps, split over two devices instead of two processes.
"""

import dataclasses
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from enfpde import checkpointing, cli, distributed
from enfpde.config import to_yaml
from enfpde.forecaster import Forecaster

WORKER = Path(__file__).with_name("distributed_worker.py")
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(preset, run_dir, *extra, process_id=None, port=None, devices=1):
    command = [sys.executable, str(WORKER), str(preset), str(run_dir), "--devices", str(devices), *map(str, extra)]
    if process_id is not None:
        command += ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(process_id)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(*processes, timeout=TIMEOUT_S):
    """Wait for the processes; kill them all if any is still running at the deadline. Returns their outputs."""
    deadline, outputs = time.time() + timeout, []
    try:
        for p in processes:
            outputs.append(p.communicate(timeout=max(1.0, deadline - time.time()))[0])
    except subprocess.TimeoutExpired:
        for p in processes:
            p.kill()
        pytest.fail(f"multi-process run still running after {timeout} s")
    for p, out in zip(processes, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


def two_processes(preset, run_dir, *extra):
    port = free_port()
    return [start(preset, run_dir, *extra, process_id=i, port=port) for i in range(2)]


def losses(run_dir):
    return [r["loss"] for r in checkpointing.read_metrics(run_dir)]


def float_leaves(run_dir):
    leaves = jax.tree.leaves(__import__("flax").nnx.state(Forecaster.load(run_dir).modules))
    return [np.asarray(x) for x in leaves if np.issubdtype(np.asarray(x).dtype, np.floating)]


def assert_same_run(run_dir, reference):
    assert [r["step"] for r in checkpointing.read_metrics(run_dir)] == [r["step"] for r in checkpointing.read_metrics(reference)]
    np.testing.assert_allclose(losses(run_dir), losses(reference), rtol=2e-5)
    # As in the two-device test of test_training_loop: Adam's first steps amplify the float reassociation of
    # the all-reduced gradients, so parameters are compared at the scale of one update.
    for a, b in zip(float_leaves(run_dir), float_leaves(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


@pytest.fixture(scope="module")
def preset(tiny_config, tmp_path_factory):
    # 4 stage-1 and 6 stage-2 steps, a checkpoint every 2: room to die between checkpoints. `enfpde evaluate`
    # scores the test split only, in two settings (the test reads its report; the train split, more sparse
    # fractions and the shifted grid would compile more forecasts in every process, through the same code).
    config = dataclasses.replace(
        tiny_config,
        train=dataclasses.replace(tiny_config.train, stage2=dataclasses.replace(tiny_config.train.stage2, epochs=3)),
        eval=dataclasses.replace(tiny_config.eval, train_split=False, sparse_fractions=[0.5], shift=False),
    )
    path = tmp_path_factory.mktemp("distributed") / "tiny.yaml"
    path.write_text(to_yaml(config))
    return path


@pytest.fixture(scope="module")
def reference(preset):
    """One process with two simulated devices: the run directory and its forecast."""
    run_dir = preset.parent / "reference"
    finish(start(preset, run_dir, "--predict", preset.parent / "reference.npy", "--evaluate", devices=2))
    return run_dir


def test_two_processes_killed_resume_train_and_forecast_like_one_process_with_two_devices(preset, reference):
    """Two processes train until one of them dies (after its checkpoint at step 6); resumed on the same two
    processes, and (N -> M) on one process with one device, each run continues the uninterrupted one-process
    sequence. The resumed two-process run then forecasts and evaluates like the one process. (One run covers what
    an uninterrupted two-process run would: its first 6 steps are compared with the reference's too.)"""
    run_dir = preset.parent / "two"
    first, second = two_processes(preset, run_dir, "--kill-at-step", 6)
    try:
        second.wait(timeout=TIMEOUT_S)  # process 1 dies right after its checkpoint at step 6
        time.sleep(1.0)
    finally:
        first.kill()  # process 0 waits in a collective for the dead one
        first.wait()
        second.kill()
    assert second.returncode == -9
    records = checkpointing.read_metrics(run_dir)
    assert 6 <= len(records) < 10, [r["step"] for r in records]
    np.testing.assert_allclose(losses(run_dir)[:6], losses(reference)[:6], rtol=2e-5)  # two processes, before the kill
    copy = shutil.copytree(run_dir, preset.parent / "killed_copy")
    # Resumed on the same two processes; the global batch is the same, only its split changes.
    outputs = finish(*two_processes(preset, run_dir, "--resume", "--predict", preset.parent / "two.npy", "--evaluate"))
    assert "process 0 of 2 with 1 device(s): done" in outputs[0] and "process 1 of 2 with 1 device(s): done" in outputs[1]
    assert_same_run(run_dir, reference)
    # One consistent checkpoint per step, metrics written once (by process 0).
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [8, 10]
    assert len(checkpointing.read_metrics(run_dir)) == 10
    # The forecast's chunks (one state each: 3 chunks over 2 processes) are gathered in order.
    np.testing.assert_allclose(np.load(preset.parent / "two.npy"), np.load(preset.parent / "reference.npy"), rtol=1e-4, atol=1e-5)
    # `enfpde evaluate` on two processes: one report, written by process 0, with the one-process numbers.
    two, one = (json.loads((d / "eval" / "test" / "metrics.json").read_text())["settings"] for d in (run_dir, reference))
    assert two.keys() == one.keys() and len(two) > 1
    for setting in one:
        np.testing.assert_allclose(two[setting]["model"]["per_frame"], one[setting]["model"]["per_frame"], rtol=1e-3)
    # The one-process resume needs no subprocess of its own: `enfpde train --resume` in this (single-device) process.
    assert cli.main(["train", "--preset", str(preset), "--run-dir", str(copy), "--quiet", "--resume"]) == 0
    assert_same_run(copy, reference)


def test_initialize_needs_a_complete_setting_and_stays_single_process_otherwise():
    assert distributed.initialize(environ={}) is False
    assert distributed.initialize(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is False
    assert distributed.initialize(num_processes=1, process_id=0, coordinator="localhost:1", environ={}) is False
    with pytest.raises(ValueError, match="missing: number of processes, process id"):
        distributed.initialize(environ={"ENFPDE_COORDINATOR": "localhost:1234"})
    with pytest.raises(ValueError, match=r"process id must be in \[0, 2\).*found process id 2 of 2"):
        distributed.initialize("localhost:1", 2, 2, environ={})
    with pytest.raises(ValueError, match="number of processes must be an integer, found 'two'"):
        distributed.initialize(environ={"ENFPDE_COORDINATOR": "h:1", "ENFPDE_NUM_PROCESSES": "two", "ENFPDE_PROCESS_ID": "0"})
    assert distributed.process_rows(4) == slice(0, 4)
    np.testing.assert_array_equal(distributed.gather(np.arange(3)), [[0, 1, 2]])
