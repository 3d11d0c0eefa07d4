import contextlib
import fcntl
import os

# Before anything imports equinox (through diffrax), and inherited by the subprocesses the tests start: diffrax's
# runtime checks (equinox's error_if) return NaN instead of raising through a host callback. A program with a
# host callback is never written to JAX's persistent compilation cache, so every train step, forecast and
# evaluation that integrates the latents would otherwise be compiled afresh by each Trainer, Forecaster and
# subprocess (in-process they are new jitted closures each time). The tests never reach those checks: the
# package refuses too many solver steps up front, and a non-finite result is its own NonFinite*Error either way.
os.environ.setdefault("EQX_ON_ERROR", "nan")
# Compile with most of XLA's optimisations off (also inherited by subprocesses): the tests' programs are small
# and run a few times each, so compiling them is most of the suite's time; this cut the compile time of a tiny
# training run and forecast by about 40 % and the CPU time of tests/test_encoder.py + tests/test_field.py by 14 %.
# Every numerical property is still checked at the same tolerance.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")


def _compile_with_xla_cpu_classic_emitters() -> None:
    """XLA:CPU's older element-wise emitters instead of its MLIR fusion emitters (also inherited by subprocesses).
    jaxlib 0.10 compiles each fusion of a program into an LLVM module of its own; with the older emitters the tiny
    training run of tests/test_training_loop.py::test_missing_points_and_the_joint_stage spent 9.9 s instead of
    22.3 s compiling its three train steps (36 -> 23 s in all). Numerics are checked at the same tolerances.
    Only for the jaxlib line it was measured on (an unknown XLA flag aborts the process), and never over a flag
    already in XLA_FLAGS."""
    from importlib import metadata

    current = os.environ.get("XLA_FLAGS", "")
    if metadata.version("jaxlib").startswith("0.10.") and "xla_cpu_use_fusion_emitters" not in current:
        os.environ["XLA_FLAGS"] = f"{current} --xla_cpu_use_fusion_emitters=false".strip()


_compile_with_xla_cpu_classic_emitters()

import pytest

from enfpde.testing import all_geometries

GEOMETRIES = all_geometries()


def pytest_itemcollected(item):
    """Under ``-n N`` (``--dist loadgroup`` in pyproject.toml): the tests of a module with module-scoped fixtures
    of its own (trained baselines, generated data, an experiment run) go to one worker together, so each such
    fixture is built once per session, not once on every worker that the balancing hands some of its tests.
    All other tests are still balanced one by one."""
    if not getattr(item.config.option, "loadgroup", False):  # set on the workers of --dist loadgroup only
        return
    module = item.nodeid.split("::")[0]
    info = getattr(item, "_fixtureinfo", None)
    definitions = info.name2fixturedefs.values() if info is not None else ()
    if any(defs[-1].scope == "module" and defs[-1].baseid == module for defs in definitions if defs):
        _join_group(item, module)


def _join_group(item, group):
    """What pytest-xdist does for an ``xdist_group`` mark: the group's name after an ``@`` in the test's node id,
    where its loadgroup scheduler looks for it. pytest-xdist 3.8 writes ``item._nodeid``, which pytest 9 no longer
    reads (the id lives in ``item._id``): under pytest 9 its marks group nothing, and every module fixture was
    built on both workers."""
    from _pytest.nodeid import coerce_node_id  # pytest >= 9.2 (pyproject.toml)

    item._id = coerce_node_id(f"{item.nodeid}@{group}")


@pytest.fixture(params=list(GEOMETRIES), ids=list(GEOMETRIES))
def geometry(request):
    return GEOMETRIES[request.param]


# --- a tiny trained run shared by the training-loop, forecast and CLI tests ------------------------------
# pytest-xdist workers share the parent of their base temporary directories; the first worker to need the
# run trains it there under a file lock and the others reuse it, so it is trained once per session.

TINY_OVERRIDES = [
    "data.horizon=4",
    "data.test_fine=null",
    "model.num_hidden=16",
    "model.latent_dim=8",
    "model.num_frequencies=8",
    "model.dynamics_hidden=16",
    "model.dynamics_frequencies=8",
    # The lean decoder: the pipeline tests need a decoder, not the released one's parts, and it compiles in two
    # thirds of the time. tests/test_field.py checks every decoder form; test_training_loop.py trains, saves and
    # reloads the released one.
    "model.context_stem=false",
    "model.full_width_heads=false",
    "model.embedding_mlp=false",
    "model.value_ffn=false",
    "model.value_mixer=false",
    "model.deep_head=false",
    # One Meta-SGD step instead of 3: the inner loop is unrolled, so every encoder call is traced and compiled
    # once per step (a tiny training run + forecast: 54 -> 46 s and 10.3 -> 7.8 s of CPU). tests/test_encoder.py
    # checks the 3-step fit itself.
    "model.inner_steps=1",
    "model.dynamics_layers=1",  # likewise: one message-passing block (training CPU 46 -> 39 s)
    "train.batch_size=2",
    "train.num_points=24",
    "train.stage1.epochs=2",
    "train.stage2.epochs=2",
    "train.checkpoint_every=2",
]


@contextlib.contextmanager
def _exclusive(path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory, worker_id):
    """A directory shared by all xdist workers of this session (the session's own when not distributed)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if worker_id != "master" else base


@pytest.fixture(scope="session")
def tiny_data(shared_dir):
    """Train, test and fine-in-time test files of exact advection solutions on an 8 x 8 torus grid."""
    from enfpde.testing import advected_waves_dataset

    root = shared_dir / "tiny_data"
    with _exclusive(shared_dir / "tiny_data.lock"):
        if not (root / "done").exists():
            root.mkdir(exist_ok=True)
            advected_waves_dataset(4, 6, 8, seed=0).to_netcdf(root / "train.nc")
            advected_waves_dataset(3, 6, 8, seed=1).to_netcdf(root / "test.nc")
            advected_waves_dataset(3, 11, 8, seed=1, frame_interval=0.5).to_netcdf(root / "test_fine.nc")
            (root / "done").touch()
    return root


@pytest.fixture(scope="session")
def tiny_config(tiny_data):
    from enfpde.config import load_config

    return load_config(None, TINY_OVERRIDES + [f"data.train={tiny_data / 'train.nc'}", f"data.test={tiny_data / 'test.nc'}"])


@pytest.fixture(scope="session")
def tiny_run(tiny_config, shared_dir):
    """An uninterrupted tiny run (4 stage-1 + 4 stage-2 steps), trained once per session; its directory.

    Tests may add files to it (evaluations) but must not change what is there."""
    from enfpde.trainer import train

    run_dir = shared_dir / "tiny_run"
    with _exclusive(shared_dir / "tiny_run.lock"):
        if not (shared_dir / "tiny_run.done").exists():
            train(tiny_config, run_dir, overwrite=True, progress=False)
            (shared_dir / "tiny_run.done").touch()
    return run_dir


@pytest.fixture(scope="session")
def forecaster(tiny_run):
    """The tiny run's forecaster (2 states per compiled call), loaded once per session (per xdist worker): its
    compiled forecasts are reused by every module. Tests only call it; none changes its attributes."""
    from enfpde.forecaster import Forecaster

    return Forecaster.load(tiny_run, batch_size=2)


@pytest.fixture(scope="module")
def initial(tiny_data):
    """The tiny test split's initial states: ``(trajectory, time=1, y, x)``."""
    import xarray as xr

    return xr.open_dataset(tiny_data / "test.nc").isel(time=[0]).load()


@contextlib.contextmanager
def optimized_compilation():
    """XLA's optimisations back on for what is compiled inside (the suite turns most of them off above)."""
    import jax

    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture
def xla_optimizations():
    """XLA's optimisations back on for one test, for the few whose time is spent running compiled code rather than
    compiling it: the meta-training test, on the released decoder then, took 134 s with them, 167 s without; on
    the lean decoder 49 s with them, 67 s without (CPU time)."""
    with optimized_compilation():
        yield
