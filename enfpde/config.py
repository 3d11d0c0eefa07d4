"""Typed run configuration: dataclasses, YAML presets and command-line overrides (through omegaconf).

A run is described by one :class:`RunConfig`. Presets are YAML files holding any subset of its fields
(``experiments/configs/<name>.yaml``); overrides are ``section.field=value`` strings, e.g.
``train.stage1.epochs=10``. Unknown keys and values of the wrong type are errors. The resolved config is
written into every run directory (``config.yaml``) and is what :meth:`enfpde.forecaster.Forecaster.load`
rebuilds the model from.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
PRESET_DIR = REPOSITORY_ROOT / "experiments" / "configs"


SPHERE_GEOMETRIES = ("sphere", "axial_sphere", "absolute_sphere")


@dataclasses.dataclass
class DataConfig:
    """Where the data is and how it is split in time.

    ``horizon`` is the number of frames of the training horizon (t_in, frame 0 included); the frames after
    it are t_out. ``geometry`` is ``torus``, ``plane``, ``sphere``, ``axial_sphere`` or ``absolute``;
    ``periods`` are the torus periods in the units of the coordinates (ordered like the spatial dimensions).
    ``test_fine`` holds the test trajectories at a finer frame interval (temporal super-resolution),
    ``test_native`` the same frames on a finer grid (zero-shot spatial super-resolution).

    ``region`` (sphere geometries only) is the latitude-longitude box ``[south, north, west, east]`` in degrees
    that the initial latents cover (enfpde.geometry.LatLonBox); ``null`` with ``auto_region`` (the default)
    takes the box of the training data's points when they do not cover the globe, and the whole sphere when
    they do. The trainer saves the box it used in the run's config.yaml, so the model keeps it.
    """

    train: str = "data/navier_stokes/train.nc"
    test: str = "data/navier_stokes/test.nc"
    test_fine: Optional[str] = "data/navier_stokes/test_fine.nc"
    test_native: Optional[str] = None
    variables: Optional[list[str]] = None
    horizon: int = 10
    geometry: str = "torus"
    periods: list[float] = dataclasses.field(default_factory=lambda: [1.0, 1.0])
    periodic_axes: list[str] = dataclasses.field(default_factory=lambda: ["y", "x"])
    region: Optional[list[float]] = None
    auto_region: bool = True

    def __post_init__(self):
        if self.region is not None:
            if self.geometry not in SPHERE_GEOMETRIES:
                raise ConfigError(
                    f"data.region is a latitude-longitude box for the sphere geometries {list(SPHERE_GEOMETRIES)}; "
                    f"data.geometry is {self.geometry!r}."
                )
            from enfpde.geometry import LatLonBox

            try:
                LatLonBox.from_list(self.region)
            except ValueError as error:
                raise ConfigError(f"data.{error}") from None


@dataclasses.dataclass
class ModelConfig:
    """Decoder, Meta-SGD encoder and latent dynamics (REFERENCE section 3, released NS config by default)."""

    num_latents: int = 4
    latent_dim: int = 16
    num_hidden: int = 128
    num_heads: int = 2
    num_frequencies: int = 64
    query_std: float = 0.05
    value_std: float = 0.1
    # The parts of the decoder that the released ENF-PDE code has beyond the lean sketch of the paper (see
    # enfpde.field); each can be switched off, which the stage-1 ablation measures.
    context_stem: bool = True
    full_width_heads: bool = True
    embedding_mlp: bool = True
    value_ffn: bool = True
    value_mixer: bool = True
    deep_head: bool = True
    k_nearest: Optional[int] = None
    chunk_size: int = 512
    width_factor: float = 1.0
    inner_steps: int = 3
    # Gradient steps of the encoder whenever it fits a state outside the stage-1 loss (forecasts, evaluation, the
    # dynamics stages' initial states and latent targets): steps past inner_steps repeat the learned step sizes,
    # which keeps lowering the fit's error (experiments/results/fit_steps.md). None: inner_steps.
    fit_steps: Optional[int] = None
    inner_points: Optional[int] = None
    # with inner_points: the inner steps fit disjoint subsets of the step's points and the stage-1 loss is
    # measured on the points left over (the released code draws independently instead: outer_points); see
    # enfpde.encoder.MetaSGDEncoder
    disjoint_subsets: bool = False
    # with inner_points and independent subsets: the stage-1 loss is measured on an independent random draw of
    # this many points (the released code's sampling: 3 inner draws and a fourth for the loss); None: every point
    outer_points: Optional[int] = None
    first_order: bool = False
    pose_lr: float = 1.0
    context_lr: float = 5.0
    learn_poses: bool = True
    dynamics_hidden: int = 128
    dynamics_layers: int = 3
    dynamics_frequencies: int = 32
    kernel_radius: Optional[float] = None
    # each latent's dynamics hear only its k nearest latents (itself included; enfpde.dynamics); None: all of them
    dynamics_k_nearest: Optional[int] = None
    # Initial value of the learned scale on both velocity read-outs of the dynamics (enfpde.dynamics): small
    # makes the untrained flow near the identity.
    dynamics_output_scale: float = 1e-3
    # The dynamics see contexts standardised by statistics of the fitted training latents (enfpde.dynamics);
    # runs saved before this switch existed are read with it off.
    standardize_contexts: bool = True
    # false: the dynamics evolve the contexts only and every latent keeps the pose Meta-SGD fitted (enfpde.dynamics)
    dynamics_move_poses: bool = True
    solver: str = "euler"
    dt0: float = 1.0
    # Data time units per model time unit: the dynamics see t / time_unit, and dt0 is in model time. Set it
    # to the frame interval (e.g. 16.67 hours for shallow water) so the latent velocity is a change per
    # frame whatever the data's time units, and the learning rates of the presets carry over.
    time_unit: float = 1.0
    # How a forecast is made (no effect on training): "none", one forecast from the initial state; "quarter_turns",
    # the mean of the four forecasts from the initial state turned by 0-3 quarter turns, each turned back
    # (enfpde.forecaster.Forecaster.predict), for 4x the forecasting cost. Only for runs trained with
    # train.augment: quarter_turns, whose data were checked to be invariant under the turns.
    forecast_ensemble: str = "none"

    def __post_init__(self):
        if self.forecast_ensemble not in FORECAST_ENSEMBLES:
            raise ConfigError(f"model.forecast_ensemble must be one of {list(FORECAST_ENSEMBLES)}, found {self.forecast_ensemble!r}.")
        for name in ("time_unit", "dt0"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"model.{name} must be positive, found {value}.")
        if self.fit_steps is not None and self.fit_steps < 0:
            raise ConfigError(f"model.fit_steps must be >= 0 (or null for inner_steps), found {self.fit_steps}.")


LR_DECAYS = ("constant", "cosine")
FORECAST_ENSEMBLES = ("none", "quarter_turns")


@dataclasses.dataclass
class StageConfig:
    """One training stage: epochs (passes over the training trajectories) and the AdamW learning rate.

    The learning rate rises linearly from 0 over ``warmup_steps`` steps and then stays at ``learning_rate``
    (``decay: constant``) or follows a cosine down to ``learning_rate * final_lr_fraction`` at the stage's last
    step (``decay: cosine``). Lengthening a cosine stage on resume stretches the rest of its curve.
    """

    epochs: int = 0
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    decay: str = "constant"
    final_lr_fraction: float = 0.0

    def __post_init__(self):
        if self.decay not in LR_DECAYS:
            raise ConfigError(f"train.<stage>.decay must be one of {list(LR_DECAYS)}, found {self.decay!r}.")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.<stage>.warmup_steps must be >= 0, found {self.warmup_steps}.")
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise ConfigError(f"train.<stage>.final_lr_fraction must be in [0, 1], found {self.final_lr_fraction}.")

    @property
    def is_constant(self) -> bool:
        """Whether the learning rate is one number for the whole stage (no schedule state in the optimiser)."""
        return self.warmup_steps == 0 and self.decay == "constant"


STAGE2_TARGETS = ("fields", "latents")
LATENT_METRICS = ("contexts", "decoder")


@dataclasses.dataclass
class LatentTargetsConfig:
    """Stage 2 on latent targets (``train.stage2_targets: latents``, :mod:`enfpde.latent_targets`).

    ``points``: random grid points each training frame is fitted on (one draw per ``fields_per_call`` frames);
    ``batch_size``: windows per stage-2 step (a latent step costs no decoding, so it can take more windows
    than a field-space step of ``train.batch_size`` trajectories).
    ``metric``: how the contexts' error counts: ``contexts``, every channel alike after scaling by its spread;
    ``decoder``, weighted by the frozen decoder's Gauss-Newton metric (:func:`enfpde.latent_targets.decoder_metric`),
    lifted by ``metric_ridge`` times its mean eigenvalue in every direction.
    """

    points: int = 1024
    batch_size: int = 8
    fields_per_call: int = 64
    metric: str = "contexts"
    metric_ridge: float = 0.01

    def __post_init__(self):
        for name in ("points", "batch_size", "fields_per_call"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.latent_targets.{name} must be >= 1, found {getattr(self, name)}.")
        if self.metric not in LATENT_METRICS:
            raise ConfigError(f"train.latent_targets.metric must be one of {list(LATENT_METRICS)}, found {self.metric!r}.")
        if not self.metric_ridge >= 0:
            raise ConfigError(f"train.latent_targets.metric_ridge must be >= 0, found {self.metric_ridge}.")


@dataclasses.dataclass
class TrainConfig:
    """The two-stage schedule (REFERENCE section 1) and the loop's bookkeeping.

    Stage 1 fits the decoder and the Meta-SGD step sizes on every frame of the horizon; stage 2 the dynamics
    with the rest frozen; the optional joint stage fine-tunes everything on the trajectory loss.
    ``batch_size`` counts trajectories; ``num_points`` is the random subset of points per step.
    ``stage1_frames`` is how many random frames of the horizon each trajectory contributes to a stage-1 step
    (the released code fits 2; ``None``: every horizon frame). ``checkpoint_every`` is in steps.
    """

    batch_size: int = 8
    num_points: Optional[int] = 512
    stage1_frames: Optional[int] = None
    # Frames of each training window (from its first) that the dynamics stages (stage 2, joint) are trained on;
    # None: all data.horizon. Fewer make each step cheaper and the rollouts shorter; the evaluation's t_in / t_out
    # split stays at data.horizon.
    stage2_frames: Optional[int] = None
    # With stage2_frames: how many steps of stage 2 train on those frames before the rest of the dynamics stages
    # train on all data.horizon frames (a short-horizon start); None: stage2_frames for the whole dynamics stages.
    stage2_frames_steps: Optional[int] = None
    # Points per frame in the dynamics stages' loss: a random draw of stage2_points of the step's num_points (a
    # pure function of seed and step); None: all num_points. Lets stage 1 draw from the whole grid (the released
    # sampling, model.inner_points / model.outer_points) while the dynamics stages decode a few hundred points.
    stage2_points: Optional[int] = None
    # What stage 2 regresses the dynamics onto: "fields" (the decoded trajectory against the data, the paper's
    # loss) or "latents" (the Meta-SGD latents of every training frame, fitted once when stage 2 starts; the
    # contexts of frames s+1.. against the rollout from frame s's latents, no decoding; needs
    # model.dynamics_move_poses: false). The joint stage trains on fields either way.
    stage2_targets: str = "fields"
    latent_targets: LatentTargetsConfig = dataclasses.field(default_factory=LatentTargetsConfig)
    stage1: StageConfig = dataclasses.field(default_factory=lambda: StageConfig(400, 1e-4))
    stage2: StageConfig = dataclasses.field(default_factory=lambda: StageConfig(1600, 1e-3))
    joint: StageConfig = dataclasses.field(default_factory=lambda: StageConfig(0, 1e-5))
    clip_norm: float = 1.0
    weight_decay: float = 1e-4
    num_microbatches: int = 1
    # Symmetry augmentation of the training data (enfpde.data.augmentation): None, or "quarter_turns" (each
    # trajectory of a batch turned by a random multiple of 90 degrees; square tori, one scalar field).
    augment: Optional[str] = None
    # Each trajectory of a batch contributes data.horizon consecutive frames from a random start frame of its
    # file instead of its first data.horizon (equally spaced frames only). For dynamics that do not depend on
    # absolute time (Navier-Stokes with its steady forcing), every window is a training sample, and stage 1
    # sees every frame. The train split's evaluation then scores frames the model was trained on.
    random_windows: bool = False
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.stage2_targets not in STAGE2_TARGETS:
            raise ConfigError(f"train.stage2_targets must be one of {list(STAGE2_TARGETS)}, found {self.stage2_targets!r}.")


@dataclasses.dataclass
class EvalConfig:
    """Evaluation settings (see :func:`enfpde.evaluation.evaluate`)."""

    batch_size: int = 8
    sparse_fractions: list[float] = dataclasses.field(default_factory=lambda: [0.5, 0.05])
    shift: bool = True
    train_split: bool = True
    # evaluate the train split on its first N trajectories only (None: all); large training sets cost minutes
    train_trajectories: Optional[int] = None
    seed: int = 0
    # variable -> factor on its error, to report in other units than the file's (None: the file's units)
    variable_scales: Optional[dict[str, float]] = None


@dataclasses.dataclass
class RunConfig:
    """Everything a run needs; saved as ``config.yaml`` in the run directory."""

    name: str = "navier_stokes"
    dataset: Optional[str] = "datasets/navier_stokes.yaml"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def __post_init__(self):
        check_forecast_ensemble(self, self.model.forecast_ensemble)


def check_forecast_ensemble(config: RunConfig, ensemble: str) -> None:
    """Refuse a forecast ensemble over a symmetry the run's data were not checked for (``train.augment``)."""
    if ensemble not in FORECAST_ENSEMBLES:
        raise ConfigError(f"forecast ensemble must be one of {list(FORECAST_ENSEMBLES)}, found {ensemble!r}.")
    if ensemble == "quarter_turns" and config.train.augment != "quarter_turns":
        raise ConfigError(
            f"the quarter-turn forecast ensemble needs a run trained with train.augment: quarter_turns (its data "
            f"checked invariant under quarter turns); this run has train.augment: {config.train.augment}."
        )


class ConfigError(ValueError):
    """A preset or an override does not fit :class:`RunConfig`."""


def preset_path(preset: str | os.PathLike) -> Path:
    """A preset name (``quick`` -> ``experiments/configs/quick.yaml``) or a path to a YAML file."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise FileNotFoundError(f"no config file at '{path}'.")
        return path
    candidate = PRESET_DIR / f"{preset}.yaml"
    if not candidate.exists():
        available = sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) if PRESET_DIR.exists() else []
        raise FileNotFoundError(f"unknown preset {str(preset)!r}; available presets in {PRESET_DIR}: {available}.")
    return candidate


def load_config(preset: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults, then the preset's YAML, then ``key=value`` overrides; returns a validated :class:`RunConfig`."""
    schema = OmegaConf.structured(RunConfig)
    layers = [schema]
    try:
        if preset is not None:
            layers.append(OmegaConf.load(preset_path(preset)))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"overrides must look like section.field=value, found {bad}.")
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(OmegaConf.merge(*layers))
    except OmegaConfBaseException as error:
        raise ConfigError(f"invalid configuration: {error}") from None


# The decoder switches' values for a run saved before they existed: such runs have the lean decoder.
LEAN_DECODER = {
    "context_stem": False,
    "full_width_heads": False,
    "embedding_mlp": False,
    "value_ffn": False,
    "value_mixer": False,
    "deep_head": False,
}


def config_from_yaml(path: str | os.PathLike) -> RunConfig:
    """Read a saved ``config.yaml``: merged onto the defaults, so unknown keys and wrong types are errors and a
    field it lacks takes its default (runs save every field), except switches added later: a run saved before
    the decoder switches existed was trained with the lean decoder, and one saved before
    ``standardize_contexts`` with raw contexts, and each is read as such."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no config file at '{path}'.")
    try:
        saved = OmegaConf.load(path)
    except Exception as error:  # YAML syntax errors come in several types
        raise ConfigError(f"{path}: not a readable YAML config ({error}).") from None
    model = saved.get("model") if isinstance(saved, DictConfig) else None
    if isinstance(model, DictConfig) and not any(k in model for k in LEAN_DECODER):
        saved = OmegaConf.merge(saved, {"model": LEAN_DECODER})
    if isinstance(model, DictConfig) and "standardize_contexts" not in model:
        saved = OmegaConf.merge(saved, {"model": {"standardize_contexts": False}})
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), saved))
    except OmegaConfBaseException as error:
        raise ConfigError(f"invalid configuration in {path}: {error}") from None


def to_yaml(config: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))
