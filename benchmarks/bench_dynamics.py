"""Speed and memory of the latent dynamics at the reference Navier-Stokes configuration (REFERENCE.md 5).

Cases (each in its own process):
  stage2     stage-2 train step: encode frame 0 with 3 Meta-SGD steps (frozen encoder and decoder), explicit
             Euler with one step per frame over 10 frames, decode 512 points per frame, batch 8; decoder
             width 128, 2 heads, 4 latents x 16; dynamics width 128, 3 layers.
  forecast   encode the full 64 x 64 initial state (3 Meta-SGD steps on 512 random points each, as the
             reference protocol samples), 20-frame rollout, decode the full grid at every frame, batch 8, one jit.
  stage2-quick       the stage-2 step of the quick preset as configured (experiments/configs/quick.yaml): 64
                     latents, lean decoder of width 64, dynamics width 64 with 2 layers, each latent hearing its 16
                     nearest, poses kept where they were fitted (the frames share the decoder's pose terms); batch
                     4, 10 frames, 256 points.
  stage2-quick-moving-poses  the same with dynamics that move the poses (model.dynamics_move_poses=true).
  stage2-quick-all   the same with moving poses and every latent hearing all 64 (the quick preset before
                     2026-12-03).
  stage2-latents-b8, -b16, -b32  the stage-2 step on latent targets (train.stage2_targets: latents) of preset
                     cpu_3h_latent_targets (experiments/configs/cpu_3h_latent_targets.yaml): dynamics width 64 with
                     4 layers, each latent hearing its 16 nearest of 64, 9 Euler steps from frame s's latents against
                     the contexts of frames s+1..s+9, no decoding; 8, 16 or 32 windows per step.

Usage: python benchmarks/bench_dynamics.py [--cases stage2 forecast] [--repeats N]
"""

from __future__ import annotations

from bench_enf import _build, measure, report

CASES = (
    "stage2", "forecast", "stage2-quick", "stage2-quick-moving-poses", "stage2-quick-all",
    "stage2-latents-b8", "stage2-latents-b16", "stage2-latents-b32",
)
REFERENCE = {"stage2": {"median_s": 2.4, "peak_gb": 2.9, "compile_s": 74.0}, "forecast": {"median_s": 11.7, "peak_gb": 1.1}}
TARGET = {"stage2": {"median_s": 0.8, "compile_s": 30.0}, "forecast": {"median_s": 4.0}}


def _quick_stage2(**overrides):
    """The quick preset's stage-2 step (its model config with ``overrides``) and a timed call."""
    import dataclasses
    from pathlib import Path

    import jax

    from enfpde.config import load_config
    from enfpde.forecaster import build_modules
    from enfpde.geometry import Torus

    config = load_config(Path(__file__).parents[1] / "experiments" / "configs" / "quick.yaml")
    model_config = dataclasses.replace(config.model, **overrides)
    torus = Torus((1.0, 1.0))
    field, encoder, dynamics = build_modules(model_config, torus, num_channels=1)
    return _stage2_call(field, encoder, dynamics, torus.sample_coords(jax.random.key(0), 256), batch=4)


def _latent_stage2(batch: int):
    """The latent stage-2 step of preset cpu_3h_latent_targets on ``batch`` windows of 10 frames and a timed call;
    the windows' latents are the (untrained) encoder's fits of random fields, their later contexts random."""
    from pathlib import Path

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from enfpde.config import load_config
    from enfpde.forecaster import build_modules
    from enfpde.geometry import Torus
    from enfpde.latent_targets import make_latent_stage2_step
    from enfpde.training import default_optimizer

    config = load_config(Path(__file__).parents[1] / "experiments" / "configs" / "cpu_3h_latent_targets.yaml")
    torus = Torus((1.0, 1.0))
    field, encoder, dynamics = build_modules(config.model, torus, num_channels=1)
    coords = torus.sample_coords(jax.random.key(0), 256)
    z0 = encoder(field, coords, jax.random.normal(jax.random.key(1), (batch, 256, 1)), key=jax.random.key(2))
    targets = jax.random.normal(jax.random.key(3), (batch, 9) + z0.contexts.shape[1:])
    optimizer = default_optimizer(1e-3)
    _, params, rest = nnx.split(dynamics, nnx.Param, ...)
    step = make_latent_stage2_step(dynamics, optimizer)
    times, scale = jnp.arange(10.0), jnp.ones(z0.contexts.shape[-1])
    carry = [params, optimizer.init(params)]

    def one():
        params, opt_state = carry
        params, opt_state, loss = step(params, opt_state, rest, z0, targets, times, scale)
        loss.block_until_ready()
        carry[:] = [params, opt_state]

    return one


def _stage2_call(field, encoder, dynamics, coords, batch):
    """One timed stage-2 train step (10 frames of random values at ``coords``, batch ``batch``) per call."""
    import jax
    import jax.numpy as jnp

    from enfpde.training import default_optimizer, make_stage2_step

    step, state, frozen, _ = make_stage2_step(field, encoder, dynamics, default_optimizer(1e-3))
    values = jax.random.normal(jax.random.key(1), (batch, 10, coords.shape[0], 1))
    times = jnp.arange(10.0)
    carry = [state.params, state.opt_state, 0]

    def one():
        params, opt_state, i = carry
        params, opt_state, loss = step(params, opt_state, state.rest, frozen, coords, values, times, jax.random.key(i))
        loss.block_until_ready()
        carry[:] = [params, opt_state, i + 1]

    return one


def run_case(name: str, repeats: int) -> dict:
    quick = {
        "stage2-quick": {},
        "stage2-quick-moving-poses": {"dynamics_move_poses": True},
        "stage2-quick-all": {"dynamics_move_poses": True, "dynamics_k_nearest": None},
    }
    if name in quick:
        return measure(name, _quick_stage2(**quick[name]), repeats)
    if name.startswith("stage2-latents-b"):
        return measure(name, _latent_stage2(int(name.removeprefix("stage2-latents-b"))), repeats)

    import jax.numpy as jnp
    from flax import nnx

    from enfpde.dynamics import EquivariantDynamics
    from enfpde.forecaster import forecast_fields

    jax, torus, model = _build()
    dynamics = EquivariantDynamics(torus, latent_dim=16, num_hidden=128, num_layers=3, rngs=nnx.Rngs(1))
    coords = torus.sample_coords(jax.random.key(0), 512)
    if name == "stage2":
        one = _stage2_call(model.field, model.encoder, dynamics, coords, batch=8)

    elif name == "forecast":
        model.encoder.inner_points = 512
        grid = (jnp.arange(64) + 0.5) / 64
        query = jnp.stack(jnp.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
        initial = jax.random.normal(jax.random.key(1), (8, 4096, 1))
        graphdef, state = nnx.split((model.field, model.encoder, dynamics))

        @jax.jit
        def forecast(state, initial, key):
            field, encoder, dyn = nnx.merge(graphdef, state)
            return forecast_fields(field, encoder, dyn, query, initial, jnp.arange(20.0), query, key=key)

        def one():
            forecast(state, initial, jax.random.key(0)).block_until_ready()

    else:
        raise ValueError(f"unknown case {name!r}; expected one of {CASES}")
    return measure(name, one, repeats)


if __name__ == "__main__":
    report(__file__, "Latent dynamics benchmark (reference Navier-Stokes configuration)", "dynamics", CASES, REFERENCE, TARGET)
