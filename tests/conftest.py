import pytest

from enfpde.testing import all_geometries

GEOMETRIES = all_geometries()


@pytest.fixture(params=list(GEOMETRIES), ids=list(GEOMETRIES))
def geometry(request):
    return GEOMETRIES[request.param]


# --- a tiny trained run shared by the training-loop, forecast and CLI tests ------------------------------
# Tests that use it carry @pytest.mark.xdist_group("tiny_run"), so that with `pytest -n 2 --dist loadgroup`
# one worker trains it once.

TINY_OVERRIDES = [
    "data.horizon=4",
    "data.test_fine=null",
    "model.num_hidden=16",
    "model.latent_dim=8",
    "model.num_frequencies=8",
    "model.dynamics_hidden=16",
    "model.dynamics_frequencies=8",
    "train.batch_size=2",
    "train.num_points=24",
    "train.stage1.epochs=2",
    "train.stage2.epochs=2",
    "train.checkpoint_every=2",
]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Train, test and fine-in-time test files of exact advection solutions on an 8 x 8 torus grid."""
    from enfpde.testing import advected_waves_dataset

    root = tmp_path_factory.mktemp("tiny_data")
    advected_waves_dataset(4, 6, 8, seed=0).to_netcdf(root / "train.nc")
    advected_waves_dataset(3, 6, 8, seed=1).to_netcdf(root / "test.nc")
    advected_waves_dataset(3, 11, 8, seed=1, frame_interval=0.5).to_netcdf(root / "test_fine.nc")
    return root


@pytest.fixture(scope="session")
def tiny_config(tiny_data):
    from enfpde.config import load_config

    return load_config(None, TINY_OVERRIDES + [f"data.train={tiny_data / 'train.nc'}", f"data.test={tiny_data / 'test.nc'}"])


@pytest.fixture(scope="session")
def tiny_run(tiny_config, tmp_path_factory):
    """An uninterrupted tiny run (4 stage-1 + 4 stage-2 steps); returns its directory."""
    from enfpde.trainer import train

    return train(tiny_config, tmp_path_factory.mktemp("runs") / "tiny", progress=False)
