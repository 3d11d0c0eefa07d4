"""The training loop: two stages (and an optional joint one), checkpoints, resume, metrics, progress.

One global step counter runs through the stages: stage 1 (decoder + Meta-SGD step sizes, reconstruction of
every horizon frame), stage 2 (dynamics only, trajectory loss from frame 0, or the rollout of fitted latents
against the latents of later frames: ``train.stage2_targets``, :mod:`enfpde.latent_targets`), then joint fine-tuning
(everything, trajectory loss). Each stage has its own AdamW state. The batch and the random key of a step
are pure functions of ``(seed, step)``, so a run killed at any moment and resumed from its last checkpoint
continues exactly the sequence an uninterrupted run would have followed.

Data parallelism: with several local devices the batch axis of every batch is sharded over a 1-D
``jax.sharding.Mesh`` and the parameters are replicated; ``jax.jit`` partitions the step (gradients are
all-reduced by the compiler). The result equals the single-device step up to float reassociation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from enfpde import checkpointing, distributed
from enfpde.config import SPHERE_GEOMETRIES, ConfigError, RunConfig, config_from_yaml, to_yaml
from enfpde.data.augmentation import check_quarter_turn_data, quarter_turn_permutations
from enfpde.data.trajectories import BatchSampler, Normalizer, TrajectoryDataset, save_json_atomic
from enfpde.forecaster import build_modules, make_geometry
from enfpde.geometry import LatLonBox, Torus
from enfpde.latent_targets import (
    context_scale,
    decoder_metric,
    fit_latent_targets,
    latent_windows,
    load_latent_targets,
    make_latent_stage2_step,
    save_latent_targets,
    targets_fingerprint,
)
from enfpde.rollout import solver_from_name
from enfpde.training import (
    NeuralFieldAutoencoder,
    default_optimizer,
    learning_rate_schedule,
    make_joint_step,
    make_stage1_step,
    make_stage2_step,
)

STAGES = ("stage1", "stage2", "joint")
LATENT_TARGETS_FILE = "latent_targets.npz"  # train.stage2_targets = latents: the fitted targets, kept for resumes

# Fields of the config that may change when a run is resumed: lengthening the schedule, changing the
# optimiser's settings from here on (e.g. after a non-finite loss) or the bookkeeping does not change what
# the steps already taken mean.
RESUMABLE_CHANGES = {
    "train.stage1.epochs",  # only while the run is still in stage 1 (Trainer._check_stage1_change)
    "train.stage2.epochs",
    "train.joint.epochs",
    "train.stage1.learning_rate",
    "train.stage2.learning_rate",
    "train.joint.learning_rate",
    # A schedule's shape may change (its state is a step count either way), but not whether there is one:
    # a constant rate keeps no step count in the optimiser state (Trainer._check_schedule_change).
    "train.stage1.warmup_steps",
    "train.stage2.warmup_steps",
    "train.joint.warmup_steps",
    "train.stage1.decay",
    "train.stage2.decay",
    "train.joint.decay",
    "train.stage1.final_lr_fraction",
    "train.stage2.final_lr_fraction",
    "train.joint.final_lr_fraction",
    "train.clip_norm",
    "train.weight_decay",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    # The encoder's steps outside the stage-1 loss: no parameter changes meaning; latent targets are refitted
    # (their fingerprint holds the steps).
    "model.fit_steps",
    # The latent loss's weighting: no parameter changes meaning.
    "train.latent_targets.metric",
    "train.latent_targets.metric_ridge",
    # How forecasts are made, not how the model is trained.
    "model.forecast_ensemble",
}


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


class RunExistsError(FileExistsError):
    """The run directory already holds a run and neither resume nor overwrite was asked for."""


def _check_schedule_change(saved: RunConfig, requested: RunConfig) -> None:
    """A resumed stage may reshape its learning-rate schedule but not gain or lose one: a schedule keeps a step
    count in the optimiser state and a constant rate does not, so the saved state would not restore."""
    for stage in STAGES:
        old, new = getattr(saved.train, stage), getattr(requested.train, stage)
        if old.is_constant != new.is_constant:
            describe = lambda c: "a constant learning rate" if c.is_constant else f"a schedule (warmup {c.warmup_steps}, {c.decay})"
            raise ConfigError(
                f"cannot resume with train.{stage} changed from {describe(old)} to {describe(new)}: the saved optimiser "
                f"state has no place for that. Keep the run's form (a schedule may change its shape) or start a new run."
            )


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Stage boundaries in global steps."""

    steps_per_epoch: int
    epochs: tuple[int, int, int]

    @property
    def boundaries(self) -> tuple[int, int, int]:
        ends = np.cumsum([e * self.steps_per_epoch for e in self.epochs])
        return tuple(int(e) for e in ends)

    @property
    def total_steps(self) -> int:
        return self.boundaries[-1]

    def stage(self, step: int) -> str:
        for name, end in zip(STAGES, self.boundaries):
            if step < end:
                return name
        raise ValueError(f"step {step} is past the end of the schedule ({self.total_steps} steps).")


def _flatten_dict(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten_dict(v, key + "."))
        else:
            out[key] = v
    return out


def _check_resumable(saved: RunConfig, requested: RunConfig) -> None:
    a = _flatten_dict(dataclasses.asdict(saved))
    b = _flatten_dict(dataclasses.asdict(requested))
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        raise ConfigError(
            "cannot resume with a different configuration; changed: "
            + ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed)
            + f". Only {sorted(RESUMABLE_CHANGES)} may change on resume; start a new run for anything else."
        )


class Trainer:
    """Trains the forecaster of a :class:`RunConfig` into a run directory.

    Args:
        config: the run configuration.
        run_dir: the run directory (created; see :mod:`enfpde.checkpointing` for its layout).
        resume: continue the run in ``run_dir`` from its latest checkpoint.
        overwrite: delete an existing run in ``run_dir`` first (without it, an existing run is an error).
        progress: show a progress bar.
        devices: devices for data parallelism (default: all local devices).
    """

    def __init__(
        self,
        config: RunConfig,
        run_dir: str | os.PathLike,
        *,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        devices=None,
    ):
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.config = config
        # Everything that can fail is checked before the run directory is touched, so a bad config never
        # costs an existing run or leaves a half-made one behind.
        self.resume = resume
        self.train_data = TrajectoryDataset.open(config.data.train, config.data.variables)
        config = self.config = self._with_region(config, resume)
        self._check_run_dir(config, resume, overwrite)
        horizon = config.data.horizon
        if not 1 < horizon <= self.train_data.num_frames:
            raise ConfigError(
                f"data.horizon = {horizon} must be in [2, {self.train_data.num_frames}] (frames in the training file)."
            )
        self.normalizer = self._normalizer(resume)
        self.geometry = make_geometry(config.data)
        self.geometry.coords_from_user(self.train_data.coords)  # coordinates fit the domain
        tc = config.train
        if tc.random_windows:
            self._check_equal_spacing()
        self.sampler = BatchSampler(
            self.train_data, self.normalizer, tc.batch_size, tc.num_points,
            frames=slice(None) if tc.random_windows else slice(0, horizon), seed=tc.seed,
            permutations=self._augmentation(), window=horizon if tc.random_windows else None,
        )
        # Every device of the job: those of this process alone unless jax.distributed runs several processes.
        self.devices = list(devices) if devices is not None else jax.devices()
        self._check_divisible()
        self.modules = build_modules(config.model, self.geometry, len(self.train_data.variables), tc.seed)
        # Train steps decode their num_points in one piece: lax.map chunks under the second-order gradient keep
        # every chunk's residuals anyway and cost time and memory (figures in experiments/README.md, ERA5).
        # num_points and num_microbatches bound training memory; model.chunk_size bounds gradient-free decoding.
        self.modules[0].chunk_size = None
        self.has_missing = not bool(self.sampler.mask.all())  # over the frames the sampler draws from
        self._check_latent_targets()
        self.latent_targets = None  # train.stage2_targets = latents: fitted when stage 2 starts (or resumes)
        self.schedule = Schedule(self.sampler.steps_per_epoch, (tc.stage1.epochs, tc.stage2.epochs, tc.joint.epochs))
        times = self.train_data.times[:horizon]
        self.times = jnp.asarray((times - times[0]) / config.model.time_unit, jnp.float32)
        self.mesh = Mesh(np.asarray(self.devices), ("batch",))
        self._build_steps()
        # Every process has checked the run directory before process 0 changes it (see enfpde.distributed).
        distributed.barrier("enfpde-trainer-checked")
        if distributed.is_main_process():
            self._prepare_run_dir(overwrite)
        distributed.barrier("enfpde-trainer-prepared")

    # -- run directory -----------------------------------------------------------------------------------

    def _check_run_dir(self, config: RunConfig, resume: bool, overwrite: bool) -> None:
        config_path = self.run_dir / checkpointing.CONFIG_FILE
        if resume:
            if not config_path.exists():
                raise FileNotFoundError(f"cannot resume: '{self.run_dir}' holds no run ({config_path.name} missing).")
            saved = config_from_yaml(config_path)
            _check_resumable(saved, config)
            self._check_stage1_change(saved, config)
            _check_schedule_change(saved, config)
        elif self.run_dir.exists() and any(self.run_dir.iterdir()) and not overwrite:
            raise RunExistsError(
                f"'{self.run_dir}' already holds a run: resume it with --resume, pick another directory, or "
                f"replace it with --overwrite."
            )

    def _with_region(self, config: RunConfig, resume: bool) -> RunConfig:
        """``config`` with ``data.region`` filled in on the sphere geometries when ``auto_region``: the box of
        the training data's points (None when they cover the globe). A resumed run keeps the box it saved."""
        d = config.data
        if d.geometry not in SPHERE_GEOMETRIES or d.region is not None or not d.auto_region:
            return config
        config_path = self.run_dir / checkpointing.CONFIG_FILE
        if resume and config_path.exists():
            region = config_from_yaml(config_path).data.region  # runs saved before regions existed: None
        else:
            box = LatLonBox.around(self.train_data.coords)
            region = None if box is None else box.as_list()
        return dataclasses.replace(config, data=dataclasses.replace(d, region=region))

    def _check_stage1_change(self, saved: RunConfig, requested: RunConfig) -> None:
        """A resumed run may lengthen or shorten stage 1 only while it is still in stage 1 (its latest
        checkpoint at or before both ends of stage 1): once the dynamics have trained on a decoder, changing the
        decoder would make their steps meaningless."""
        old, new = saved.train.stage1.epochs, requested.train.stage1.epochs
        if old == new:
            return
        steps_per_epoch = self.train_data.num_trajectories // requested.train.batch_size
        checkpoint_dir = self.run_dir / checkpointing.CHECKPOINT_DIR
        steps = [int(p.name) for p in checkpoint_dir.iterdir() if p.name.isdigit()] if checkpoint_dir.exists() else []
        latest = max(steps, default=0)
        if latest > min(old, new) * steps_per_epoch:
            raise ConfigError(
                f"cannot change train.stage1.epochs from {old} to {new}: the latest checkpoint (step {latest}) is past "
                f"step {min(old, new) * steps_per_epoch}, where stage 1 would end. Stage 1 can be changed only while the run "
                f"is still in it; lengthen train.stage2.epochs or train.joint.epochs instead, or start a new run."
            )

    def _normalizer(self, resume: bool) -> Normalizer:
        """Statistics of the training split; on resume, those stored with the run, which must still match."""
        fitted = self.train_data.fit_normalizer()
        if resume and (self.run_dir / checkpointing.MODEL_FILE).exists():
            stored = Normalizer.from_dict(checkpointing.read_model_metadata(self.run_dir)["normalizer"])
            if not (np.allclose(stored.mean, fitted.mean, rtol=1e-5) and np.allclose(stored.std, fitted.std, rtol=1e-5)):
                raise ConfigError(
                    f"the training file {self.config.data.train} has changed since the run started: its statistics "
                    f"(mean {fitted.mean}, std {fitted.std}) differ from those stored with the run (mean {stored.mean}, "
                    f"std {stored.std}). Resume with the original data or start a new run."
                )
            return stored
        return fitted

    def _prepare_run_dir(self, overwrite: bool) -> None:
        """Create (or, with ``overwrite``, replace) the run directory; write the config and model metadata."""
        if overwrite and self.run_dir.exists() and not self.resume:
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.run_dir / checkpointing.CONFIG_FILE
        tmp = config_path.with_name(".config.yaml.tmp")
        tmp.write_text(to_yaml(self.config))
        os.replace(tmp, config_path)
        self._write_metadata()

    def _write_metadata(self) -> None:
        data, horizon = self.train_data, self.config.data.horizon
        frame_interval = float(np.median(np.diff(data.times))) if data.num_frames > 1 else 1.0
        save_json_atomic(
            self.run_dir / checkpointing.MODEL_FILE,
            {
                "variables": list(data.variables),
                "units": list(data.units),
                "axes": list(data.axes),
                "grid_shape": list(data.grid_shape) if data.grid_shape else None,
                "time_units": data.time_units,
                "frame_interval": frame_interval,
                "horizon": horizon,
                "horizon_time": float(data.times[horizon - 1] - data.times[0]) + frame_interval,
                "normalizer": self.normalizer.to_dict(),
                "train_file": str(self.config.data.train),
            },
        )

    # -- steps -------------------------------------------------------------------------------------------

    def _check_divisible(self) -> None:
        n, tc = len(self.devices), self.config.train
        if tc.batch_size % n:
            raise ConfigError(f"train.batch_size = {tc.batch_size} must be divisible by the {n} devices used for data parallelism.")
        horizon = self.config.data.horizon
        if tc.stage1_frames is not None and not 1 <= tc.stage1_frames <= horizon:
            raise ConfigError(f"train.stage1_frames = {tc.stage1_frames} must be in [1, {horizon}] (data.horizon) or null.")
        if tc.stage2_frames is not None and not 2 <= tc.stage2_frames <= horizon:
            raise ConfigError(f"train.stage2_frames = {tc.stage2_frames} must be in [2, {horizon}] (data.horizon) or null.")
        if tc.stage2_frames_steps is not None and (tc.stage2_frames is None or tc.stage2_frames_steps < 0):
            raise ConfigError(
                f"train.stage2_frames_steps = {tc.stage2_frames_steps} needs train.stage2_frames and must be >= 0 "
                f"(found stage2_frames = {tc.stage2_frames})."
            )
        if tc.stage2_points is not None and not 1 <= tc.stage2_points <= self.sampler.num_points:
            raise ConfigError(
                f"train.stage2_points = {tc.stage2_points} must be in [1, {self.sampler.num_points}] (the points of a step: "
                f"train.num_points, or all of the training file's points if it has fewer) or null."
            )
        fields = tc.batch_size * self.stage1_frames
        if fields % tc.num_microbatches:
            raise ConfigError(
                f"train.num_microbatches = {tc.num_microbatches} must divide the {fields} stage-1 fields per batch "
                f"(train.batch_size x train.stage1_frames)."
            )

    @property
    def stage1_frames(self) -> int:
        frames = self.config.train.stage1_frames
        return self.config.data.horizon if frames is None else frames

    def _stage1_frames(
        self, values: np.ndarray, mask: np.ndarray, step: int, rows: slice = slice(None)
    ) -> tuple[np.ndarray, np.ndarray]:
        """The frames of a batch that stage 1 fits at ``step``: ``[b, T, ...] -> [b * k, ...]``.

        With ``train.stage1_frames = k`` each trajectory contributes ``k`` distinct random frames, a pure
        function of ``(seed, step)`` like the batch itself; otherwise every frame. ``values`` may be the
        ``rows`` of the global batch that this process builds: the draws are those of the global batch.
        """
        b, t = values.shape[:2]
        k = self.stage1_frames
        if k < t:
            # Random streams of a step: 0-3 the sampler's (order, points, quarter turns, windows), 4 stage-2 points.
            rng = np.random.default_rng([self.config.train.seed, 5, step])
            global_b = self.config.train.batch_size if rows != slice(None) else b
            idx = np.stack([np.sort(rng.choice(t, k, replace=False)) for _ in range(global_b)])[rows]  # [b, k]
            values = np.take_along_axis(values, idx.reshape(b, k, *([1] * (values.ndim - 2))), axis=1)
            mask = np.take_along_axis(mask, idx.reshape(b, k, *([1] * (mask.ndim - 2))), axis=1)
        return values.reshape((b * k,) + values.shape[2:]), mask.reshape((b * k,) + mask.shape[2:])

    @property
    def stage2_on_latents(self) -> bool:
        return self.config.train.stage2_targets == "latents"

    def _check_latent_targets(self) -> None:
        if not self.stage2_on_latents:
            return
        lt, mc = self.config.train.latent_targets, self.config.model
        if mc.dynamics_move_poses:
            raise ConfigError(
                "train.stage2_targets = 'latents' needs model.dynamics_move_poses: false: the targets are the contexts "
                "fitted at the initial poses, which moving poses would leave behind."
            )
        if self.has_missing:
            raise ConfigError(
                f"train.stage2_targets = 'latents' needs training data without missing values; {self.config.data.train} "
                f"has some. Use train.stage2_targets: fields."
            )
        if lt.batch_size % len(self.devices):
            raise ConfigError(
                f"train.latent_targets.batch_size = {lt.batch_size} must be divisible by the {len(self.devices)} devices "
                f"used for data parallelism."
            )

    def _fit_latent_targets(self) -> None:
        """The latents of every frame the sampler draws from, fitted with the frozen stage-1 model, or read from
        ``latent_targets.npz`` in the run directory when they were fitted there before under the same model, data
        and settings (a resumed run then skips the fit: about 14 machine minutes for 20480 frames on 1024 points).

        With ``train.augment`` the targets hold every symmetry's copy of each trajectory, symmetry-major
        (``[K * N, F]``): the dynamics see K times the trajectories, for K times the fitting cost."""
        lt, seed = self.config.train.latent_targets, self.config.train.seed
        field, encoder, dynamics = self.modules
        values = self.sampler.values  # [N, F, M, C]
        turns = self.sampler.permutations
        fingerprint = targets_fingerprint(
            field, encoder, values, points=lt.points, fields_per_call=lt.fields_per_call, seed=seed,
            permutations=None if turns is None else turns.tolist(), fit_steps=encoder.fit_steps,
        )
        path = self.run_dir / LATENT_TARGETS_FILE
        self.latent_targets = load_latent_targets(path, fingerprint)
        if self.latent_targets is None:
            if turns is not None:
                values = np.concatenate([values[:, :, perm] for perm in turns])
            main = distributed.is_main_process()
            if self.progress and main:
                tqdm.write(f"fitting the latents of {values.shape[0] * values.shape[1]} training frames on {lt.points} "
                           f"points each (train.stage2_targets = latents)")
            self.latent_targets = fit_latent_targets(
                field, encoder, self.geometry.coords_from_user(self.sampler.coords), values,
                points=lt.points, fields_per_call=lt.fields_per_call, seed=seed, progress=self.progress and main,
            )
            if main:
                save_latent_targets(path, self.latent_targets, fingerprint)
        scale = context_scale(dynamics, self.latent_targets)
        self.latent_scale = self._replicate(jnp.asarray(scale))
        self.latent_metric = None
        if lt.metric == "decoder":  # about a machine minute; recomputed on resume (a pure function of the seed)
            metric = decoder_metric(
                field, self.latent_targets, self.geometry.coords_from_user(self.sampler.coords), scale,
                ridge=lt.metric_ridge, seed=seed,
            )
            self.latent_metric = self._replicate(jnp.asarray(metric))

    def _latent_batch(self, step: int, frames: int) -> tuple:
        """This process's windows of the latent stage-2 batch of ``step``: random trajectories and start frames (a
        pure function of ``(seed, step)``), from frame 0 only unless ``train.random_windows``."""
        n, f = self.latent_targets.contexts.shape[:2]
        lt = self.config.train.latent_targets
        rng = np.random.default_rng([self.config.train.seed, 6, step])
        rows = rng.choice(n, lt.batch_size, replace=lt.batch_size > n)
        last_start = f - frames if self.config.train.random_windows else 0
        starts = rng.integers(0, last_start + 1, lt.batch_size)
        mine = distributed.process_rows(lt.batch_size)
        return latent_windows(self.latent_targets, rows[mine], starts[mine], frames)

    def _stage2_frames(self, step: int) -> int:
        """Frames of each window that the dynamics stages train on at global ``step``: ``train.stage2_frames``
        (for the first ``train.stage2_frames_steps`` steps of stage 2 when that is set), else ``data.horizon``."""
        tc = self.config.train
        if tc.stage2_frames is None:
            return self.config.data.horizon
        if tc.stage2_frames_steps is not None and step >= self.schedule.boundaries[0] + tc.stage2_frames_steps:
            return self.config.data.horizon
        return tc.stage2_frames

    def _stage2_points(self, step: int, num_points: int) -> np.ndarray | slice:
        """The points of a step's batch that the dynamics stages' loss uses: ``train.stage2_points`` of them drawn at
        random (a pure function of ``(seed, step)``, like the batch), or all."""
        k = self.config.train.stage2_points
        if k is None or k >= num_points:
            return slice(None)
        return np.sort(np.random.default_rng([self.config.train.seed, 4, step]).choice(num_points, k, replace=False))

    def _optimizer(self, stage):
        tc = self.config.train
        num_steps = stage.epochs * self.sampler.steps_per_epoch
        lr = learning_rate_schedule(
            stage.learning_rate, num_steps, warmup_steps=stage.warmup_steps, decay=stage.decay,
            final_fraction=stage.final_lr_fraction,
        )
        return default_optimizer(lr, tc.clip_norm, tc.weight_decay)

    def _build_steps(self) -> None:
        field, encoder, dynamics = self.modules
        tc, mc = self.config.train, self.config.model
        solver = solver_from_name(mc.solver)
        self.autoencoder = NeuralFieldAutoencoder(field, encoder)
        self.step1, s1, _ = make_stage1_step(
            self.autoencoder, self._optimizer(tc.stage1), num_microbatches=tc.num_microbatches
        )
        self.step2, s2, _, _ = make_stage2_step(
            field, encoder, dynamics, self._optimizer(tc.stage2), solver=solver, dt0=mc.dt0
        )
        self.step2_latents = make_latent_stage2_step(dynamics, self._optimizer(tc.stage2), solver=solver, dt0=mc.dt0)
        self.step3, s3, _ = make_joint_step(field, encoder, dynamics, self._optimizer(tc.joint), solver=solver, dt0=mc.dt0)
        self.opt_states = {"stage1": s1.opt_state, "stage2": s2.opt_state, "joint": s3.opt_state}

    # -- the loop ----------------------------------------------------------------------------------------

    def _train_state(self, step: int) -> dict:
        return {"step": jnp.asarray(step, jnp.int32), **self.opt_states}

    def _save(self, manager, step: int) -> None:
        # Replicated over the mesh: orbax then writes every array once, whatever the number of processes.
        model_state = self._replicate(nnx.state(self.modules))
        leaves = [x for x in jax.tree.leaves(model_state) if jnp.issubdtype(x.dtype, jnp.floating)]
        if not bool(distributed.to_host(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])))):
            raise NonFiniteLossError(f"parameters became non-finite at step {step}; not saving them.")
        checkpointing.save(manager, step, model_state, self._replicate(self._train_state(step)))

    def _restore(self, manager) -> int:
        """Restore the newest checkpoint that restores (a damaged newer one is skipped, and said so)."""
        if manager.latest_step() is None:
            return 0
        step, model_state, train_state, skipped = checkpointing.restore_newest(
            manager, nnx.state(self.modules), self._train_state(0), run_dir=f"'{self.run_dir}'"
        )
        if skipped:
            distributed.barrier("enfpde-restored")  # every process has read before process 0 moves files
            damaged = [bad for bad, _ in skipped]
            if distributed.is_main_process():
                kept = checkpointing.set_aside(self.run_dir, damaged)
            else:
                kept = [self.run_dir / checkpointing.CHECKPOINT_DIR / f"damaged-{bad}" for bad in damaged]
            distributed.barrier("enfpde-set-aside")
            tqdm.write(
                f"{self.run_dir}: {checkpointing.describe_skipped(skipped)}; resuming from step {step}. The damaged "
                f"checkpoint(s) were moved to {', '.join(map(str, kept))}, so the resumed run can write those steps again.",
                file=sys.stderr,
            )
            manager.reload()
        nnx.update(self.modules, model_state)
        self.opt_states = {k: train_state[k] for k in STAGES}
        return int(train_state["step"])

    def _truncate_metrics(self, last_step: int) -> dict[str, float]:
        """Drop log lines of steps after the checkpoint we resume from (they will be redone).

        Returns the clocks (``elapsed_s``, ``cpu_s``) of the last kept line, where the resumed process's clocks
        continue (zeros for a fresh run)."""
        records = [r for r in checkpointing.read_metrics(self.run_dir) if r["step"] < last_step]
        path = self.run_dir / checkpointing.METRICS_FILE
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, path)
        return {key: float(records[-1].get(key, 0.0)) if records else 0.0 for key in ("elapsed_s", "cpu_s")}

    def _replicate(self, tree):
        return distributed.replicate(tree, self.mesh)

    def run(self, *, stop_after: int | None = None) -> Path:
        """Train to the end of the schedule (or until global step ``stop_after``, for tests and budgets).

        Returns the run directory. Raises :class:`NonFiniteLossError` on a NaN or infinite loss.
        """
        tc = self.config.train
        manager = checkpointing.checkpoint_manager(self.run_dir, max_to_keep=tc.keep_checkpoints)
        try:
            start = self._restore(manager) if self.resume else 0
            clocks = self._truncate_metrics(start) if distributed.is_main_process() else {"elapsed_s": 0.0, "cpu_s": 0.0}
            end = self.schedule.total_steps if stop_after is None else min(stop_after, self.schedule.total_steps)
            self._loop(manager, start, end, clocks)
            manager.wait_until_finished()
        finally:
            manager.close()
        return self.run_dir

    def _check_equal_spacing(self) -> None:
        """Random windows share one set of lead times, so the training file's frames must be equally spaced."""
        steps = np.diff(self.train_data.times)
        if not np.allclose(steps, steps[0], rtol=1e-6, atol=0.0):
            raise ConfigError(
                f"train.random_windows needs equally spaced frames; the training file's frame intervals are "
                f"{sorted(set(np.round(steps, 6).tolist()))} ({self.config.data.train})."
            )

    def _augmentation(self) -> np.ndarray | None:
        """The point permutations of ``train.augment`` for the training file, or None."""
        augment = self.config.train.augment
        if augment is None:
            return None
        if augment != "quarter_turns":
            raise ConfigError(f"train.augment must be null or 'quarter_turns'; found {augment!r}.")
        if not isinstance(self.geometry, Torus):
            raise ConfigError(f"train.augment = 'quarter_turns' is for the torus; data.geometry is {self.config.data.geometry!r}.")
        try:
            check_quarter_turn_data(self.train_data.attrs, list(self.train_data.variables))
            return quarter_turn_permutations(self.train_data.coords, self.geometry.periods)
        except ValueError as error:
            raise ConfigError(f"train.augment = 'quarter_turns' on {self.config.data.train}: {error}") from None

    def _set_context_statistics(self, step: int, min_fields: int = 64) -> None:
        """Before the dynamics stage: standardise the dynamics' inputs with the statistics of latents fitted to the
        horizon frames of a few training batches (at least ``min_fields`` fields). Every process fits the same
        global batches, so the statistics agree everywhere; a resumed run restores them from its checkpoint."""
        field, encoder, dynamics = self.modules
        if dynamics.context_mean is None:
            return

        @nnx.jit
        def fitted_contexts(field, encoder, coords, values, mask, key):
            return encoder(field, coords, values, mask, key=key).contexts

        contexts = []
        batches = -(-min_fields // (self.config.train.batch_size * self.config.data.horizon))
        for k in range(batches):
            batch = self.sampler(step + k)
            values = batch.values.reshape(-1, *batch.values.shape[2:])  # [B * T, M, C]
            mask = batch.mask.reshape(-1, batch.mask.shape[-1]) if self.has_missing else None
            key = jax.random.fold_in(jax.random.key(self.config.train.seed + 1), k)  # any key: only inner subsets use it
            coords = self.geometry.coords_from_user(batch.coords)
            contexts.append(fitted_contexts(field, encoder, coords, values, mask, key))
        dynamics.set_context_statistics(jnp.concatenate(contexts))

    def _stage_params(self, stage: str):
        field, encoder, dynamics = self.modules
        if stage == "stage1":
            return nnx.split(self.autoencoder, nnx.Param, ...)[1:]
        if stage == "stage2":
            return nnx.split(dynamics, nnx.Param, ...)[1:]
        return nnx.split(self.modules, nnx.Param, ...)[1:]

    def _write_back(self, stage: str, params, rest) -> None:
        """Copy a stage's parameters back into the modules (the source of truth between stages)."""
        target = {"stage1": self.autoencoder, "stage2": self.modules[2], "joint": self.modules}[stage]
        nnx.update(target, params, rest)

    def _field_step(self, stage: str, step: int, params, opt_state, rest, frozen, rows: slice, times, key):
        """One step of ``stage`` on the fields of the step's batch (this process's ``rows`` of it); ``times``: the
        lead times of the frames the dynamics stages train on. Returns ``(params, opt_state, loss)``."""
        shard = lambda x: distributed.shard_rows(x, self.mesh)
        batch = self.sampler(step, rows=rows)
        key = self._replicate(key)
        mask = None
        if stage == "stage1":
            values, fields_mask = self._stage1_frames(batch.values, batch.mask, step, rows)
            if self.has_missing:
                mask = shard(fields_mask)
            coords = self._replicate(self.geometry.coords_from_user(batch.coords))
            return self.step1(params, opt_state, rest, coords, shard(values), key, mask)
        frames = times.shape[0]
        points = self._stage2_points(step, batch.coords.shape[0])
        coords = self._replicate(self.geometry.coords_from_user(batch.coords[points]))
        values = shard(batch.values[:, :frames, points])
        if self.has_missing:
            mask = shard(batch.mask[:, :frames, points])
        if stage == "stage2":
            return self.step2(params, opt_state, rest, frozen, coords, values, times, key, mask)
        return self.step3(params, opt_state, rest, coords, values, times, key, mask)

    def _loop(self, manager, start: int, end: int, clocks: dict[str, float]) -> None:
        """Train steps ``start`` to ``end`` - 1, logging each; ``clocks`` are the log's times where it goes on."""
        tc = self.config.train
        main = distributed.is_main_process()  # logs and shows progress; every process trains
        metrics_path = self.run_dir / checkpointing.METRICS_FILE
        bar = tqdm(
            total=end, initial=start, disable=not (self.progress and main), desc="training", unit="step", dynamic_ncols=True
        )
        base_key = jax.random.key(tc.seed)
        # The dynamics stages train on the first stage2_frames frames of each window (for a while: _stage2_frames).
        times_for = {}  # frames -> their lead times, replicated once
        rows = distributed.process_rows(tc.batch_size)  # this process's trajectories of every batch
        stage, params, rest, frozen, opt_state = None, None, None, None, None
        # A resumed process's clocks go on from the last kept log line, so the log's times are cumulative.
        t_start = time.perf_counter() - clocks["elapsed_s"]
        cpu_start = time.process_time() - clocks["cpu_s"]
        with open(metrics_path, "a") if main else contextlib.nullcontext() as log:
            for step in range(start, end):
                new_stage = self.schedule.stage(step)
                if new_stage != stage:
                    if stage is not None:
                        self._write_back(stage, params, rest)
                        self.opt_states[stage] = opt_state
                    stage = new_stage
                    if stage == "stage2" and step == self.schedule.boundaries[0]:
                        self._set_context_statistics(step)
                    if stage == "stage2" and self.stage2_on_latents:
                        self._fit_latent_targets()
                    params, rest = self._stage_params(stage)
                    params, rest = self._replicate(params), self._replicate(rest)
                    opt_state = self._replicate(self.opt_states[stage])
                    if stage == "stage2":
                        frozen = self._replicate(nnx.state((self.modules[0], self.modules[1])))
                    bar.set_description(stage)
                shard = lambda x: distributed.shard_rows(x, self.mesh)
                frames2 = self._stage2_frames(step)
                if frames2 not in times_for:
                    times_for[frames2] = self._replicate(self.times[:frames2])
                times = times_for[frames2]
                if stage == "stage2" and self.stage2_on_latents:  # no fields to draw: windows of the fitted latents
                    z0, target_contexts = self._latent_batch(step, frames2)
                    params, opt_state, loss = self.step2_latents(
                        params, opt_state, rest, jax.tree.map(shard, z0), shard(target_contexts), times, self.latent_scale,
                        self.latent_metric,
                    )
                else:
                    params, opt_state, loss = self._field_step(
                        stage, step, params, opt_state, rest, frozen, rows, times, jax.random.fold_in(base_key, step)
                    )
                loss = float(distributed.to_host(loss))
                epoch = step // self.schedule.steps_per_epoch
                if not math.isfinite(loss):
                    bar.close()
                    manager.wait_until_finished()
                    last = manager.latest_step()
                    kept = (
                        f"The last good checkpoint (step {last}) is kept in '{self.run_dir}'"
                        if last is not None else f"No checkpoint was written yet in '{self.run_dir}'"
                    )
                    raise NonFiniteLossError(
                        f"non-finite loss ({loss}) at step {step} ({stage}, epoch {epoch}); training stopped. {kept}. "
                        f"Lower train.{stage}.learning_rate or train.clip_norm and continue with --resume."
                    )
                record = {"step": step, "epoch": epoch, "stage": stage, "loss": loss,
                          "elapsed_s": round(time.perf_counter() - t_start, 3),
                          # CPU seconds of every thread of this process: a cost that other jobs on the
                          # machine inflate much less than the wall time (both go on from the log on resume).
                          "cpu_s": round(time.process_time() - cpu_start, 3)}
                if main:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3e}", epoch=epoch)
                done = step + 1
                stage_end = done in self.schedule.boundaries
                if done % tc.checkpoint_every == 0 or stage_end or done == end:
                    self._write_back(stage, params, rest)
                    self.opt_states[stage] = opt_state
                    self._save(manager, done)
        bar.close()


def train(config: RunConfig, run_dir, **kwargs) -> Path:
    """Train ``config`` into ``run_dir``; see :class:`Trainer` for the options."""
    stop_after = kwargs.pop("stop_after", None)
    return Trainer(config, run_dir, **kwargs).run(stop_after=stop_after)
