"""The run directory: resolved config, model metadata, orbax checkpoints and the metrics log.

Layout of ``runs/<name>/``::

    config.yaml       the resolved RunConfig (enfpde.config)
    model.json        what a forecast needs besides weights: variables, units, axes, time units,
                      normalisation statistics fitted on the training split, the horizon
    checkpoints/<step>/{model,train}   orbax checkpoints; ``model`` holds the decoder, encoder and dynamics
                      states, ``train`` the optimiser states and the step
    metrics.jsonl     one JSON object per logged step
    eval/             evaluation reports, figures and forecasts

Checkpoints are written by orbax's CheckpointManager (never by hand); ``model`` can be restored alone,
which is what :meth:`enfpde.forecaster.Forecaster.load` does.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.json"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"


def checkpoint_manager(run_dir: str | os.PathLike, *, max_to_keep: int | None = 2) -> ocp.CheckpointManager:
    """The run's CheckpointManager (items ``model`` and ``train``), keeping the newest ``max_to_keep``."""
    directory = Path(run_dir).resolve() / CHECKPOINT_DIR
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(directory, options=options)


def abstract(tree):
    """Shapes and dtypes of a pytree of arrays: the restore target orbax needs."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def save(manager: ocp.CheckpointManager, step: int, model_state, train_state) -> None:
    """Save both items at ``step`` (asynchronously; call ``manager.wait_until_finished()`` before reading)."""
    manager.save(
        step,
        args=ocp.args.Composite(model=ocp.args.StandardSave(model_state), train=ocp.args.StandardSave(train_state)),
        force=True,
    )


def restore(manager: ocp.CheckpointManager, step: int, model_target, train_target=None):
    """Restore ``model`` (and ``train`` if a target is given) at ``step`` into the targets' structure."""
    items = {"model": ocp.args.StandardRestore(abstract(model_target))}
    if train_target is not None:
        items["train"] = ocp.args.StandardRestore(abstract(train_target))
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return restored["model"], restored.get("train") if train_target is not None else None


class CheckpointError(RuntimeError):
    """No checkpoint of a run could be restored."""


def restore_newest(manager: ocp.CheckpointManager, model_target, train_target=None, *, run_dir="the run"):
    """Restore the newest checkpoint that restores, skipping damaged ones (a kill during a write, a truncated
    copy, a full disk).

    Returns:
        ``(step, model_state, train_state, skipped)`` with ``skipped`` a list of ``(step, reason)`` for the newer
        checkpoints that failed, newest first.

    Raises:
        CheckpointError: the run has checkpoints and none restores (every reason is listed).
    """
    skipped = []
    with _EventLoopNoiseFilter() as noise:
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                model_state, train_state = restore(manager, step, model_target, train_target)
            except Exception as error:  # orbax and tensorstore raise many types for damaged files
                skipped.append((step, f"{type(error).__name__}: {' '.join(str(error).split())[:160]}"))
                noise.drop = True
                continue
            return step, model_state, train_state, skipped
    if not skipped:
        raise CheckpointError(f"{run_dir} has no checkpoint yet.")
    raise CheckpointError(
        f"no checkpoint of {run_dir} restores: " + "; ".join(f"step {s}: {why}" for s, why in skipped)
    )


def set_aside(run_dir, steps) -> list[Path]:
    """Move damaged checkpoints to ``checkpoints/damaged-<step>[-k]`` (never deleted; orbax ignores the name)."""
    moved = []
    for step in steps:
        source = Path(run_dir).resolve() / CHECKPOINT_DIR / str(step)
        target = source.with_name(f"damaged-{step}")
        k = 1
        while target.exists():
            target, k = source.with_name(f"damaged-{step}-{k}"), k + 1
        source.rename(target)
        moved.append(target)
    return moved


class _EventLoopNoiseFilter:
    """Hold back what is written to stderr (file descriptor 2) while checkpoints are restored, and write it back
    afterwards. When a restore failed (``drop`` set), the lines of the tracebacks that orbax's reader threads
    print for reads still pending on its closed event loop ("RuntimeError: Event loop is closed", dozens of
    them per damaged checkpoint) are dropped: the failure itself is reported once, with the step skipped."""

    _NOISE = ("Event loop is closed", "_check_closed", "call_soon_threadsafe", "Traceback (most recent call last)")

    def __enter__(self):
        self.drop = False
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
        except (OSError, ValueError):  # no usable file descriptor 2 (embedded interpreters): filter nothing
            self._saved = None
            return self
        self._capture = tempfile.TemporaryFile()
        os.dup2(self._capture.fileno(), 2)
        return self

    def __exit__(self, *exc):
        if self._saved is None:
            return False
        if self.drop:  # the failed restore's reader threads are still printing: wait until they are quiet
            size, quiet_since, start = -1, time.monotonic(), time.monotonic()
            while time.monotonic() - quiet_since < 0.5 and time.monotonic() - start < 5.0:
                now = os.fstat(self._capture.fileno()).st_size
                if now != size:
                    size, quiet_since = now, time.monotonic()
                time.sleep(0.05)
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._capture.seek(0)
        text = self._capture.read().decode(errors="replace")
        self._capture.close()
        if self.drop:
            text = "".join(
                line for line in text.splitlines(keepends=True)
                if line.strip() and not any(marker in line for marker in self._NOISE)
            )
        if text:
            sys.stderr.write(text)
            sys.stderr.flush()
        return False


def describe_skipped(skipped) -> str:
    return "; ".join(f"skipped the damaged checkpoint at step {s} ({why})" for s, why in skipped)


def read_model_metadata(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"'{run_dir}' is not an enfpde run directory: {MODEL_FILE} is missing (train a model with `enfpde train`)."
        )
    try:
        metadata = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"'{path}' is not valid JSON ({error}); the file is damaged or cut short. It is written when training "
            f"starts: restore it from a copy, or retrain the run."
        ) from None
    if not isinstance(metadata, dict) or "variables" not in metadata or "normalizer" not in metadata:
        raise ValueError(f"'{path}' does not describe a model: expected an object with 'variables' and 'normalizer'.")
    return metadata


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The metrics log as a list of records (empty if the run has not logged yet).

    A last line cut short (the process was killed while writing it) is skipped; a broken line elsewhere is
    an error."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON: {line[:80]!r}") from None
    return records
