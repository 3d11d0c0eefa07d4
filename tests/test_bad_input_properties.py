"""Property-based bad input: hypothesis draws malformed initial states, masks, coordinates and lead times for
`Forecaster.forecast`. Each draw must end in a clear ValueError / TypeError / KeyError raised by the package's
own checks, or in a correct forecast (finite, the right dimensions and shape); never anything else.

The valid draws reuse a few array shapes, so the compiled forecast is shared across examples."""

import numpy as np
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


VALID_TIMES = ([0.0], [0.0, 0.5, 1.0, 3.0])


def _at(d, draw_index, values):
    """Set ``values`` at flat positions of ``u`` (a copy)."""
    u = d.u.values.copy()
    flat = u.reshape(-1)
    if flat.size == 0:
        return d
    flat[np.asarray(draw_index) % flat.size] = values
    return d.assign(u=(d.u.dims, u, d.u.attrs))


MUTATIONS = {
    "none": lambda d, k: d,
    "float64 field": lambda d, k: d.assign(u=d.u.astype(np.float64)),
    "int field": lambda d, k: d.assign(u=(d.u * 100).astype(np.int32)),
    "float16 field": lambda d, k: d.assign(u=d.u.astype(np.float16)),
    "bool field": lambda d, k: d.assign(u=d.u > 0),
    "complex field": lambda d, k: d.assign(u=d.u.astype(np.complex64)),
    "string field": lambda d, k: d.assign(u=d.u.astype(str)),
    "object field": lambda d, k: d.assign(u=d.u.astype(object)),
    "NaN": lambda d, k: _at(d, [k], np.nan),
    "inf": lambda d, k: _at(d, [k, k + 7], np.inf),
    "-inf": lambda d, k: _at(d, [k], -np.inf),
    "huge": lambda d, k: _at(d, [k], 3e38),
    "NaN with a mask that hides it": lambda d, k: _at(d, [k], np.nan).assign(mask=~np.isnan(_at(d, [k], np.nan).u)),
    "NaN with a mask that shows it": lambda d, k: _at(d, [k], np.nan).assign(mask=xr.ones_like(d.u, dtype=bool)),
    "mask of floats": lambda d, k: d.assign(mask=xr.ones_like(d.u)),
    "mask all False": lambda d, k: d.assign(mask=xr.zeros_like(d.u, dtype=bool)),
    "mask on other dims": lambda d, k: d.assign(mask=xr.DataArray(np.ones(k % 5 + 1, bool), dims="z")),
    "mask per grid only": lambda d, k: d.assign(mask=(d.x > 0.2).broadcast_like(d.y)),
    "renamed variable": lambda d, k: d.rename(u="v"),
    "extra variable": lambda d, k: d.assign(w=d.u * 2),
    "dropped x coordinate": lambda d, k: d.drop_vars("x"),
    "string x coordinate": lambda d, k: d.assign_coords(x=[f"c{i}" for i in range(d.x.size)]),
    "datetime y coordinate": lambda d, k: d.assign_coords(y=np.datetime64("2000-01-01") + np.arange(d.y.size).astype("timedelta64[h]")),
    "duplicate x": lambda d, k: d.assign_coords(x=np.r_[d.x.values[:-1], d.x.values[0]]),
    "x outside the domain": lambda d, k: d.assign_coords(x=d.x + 5.0),
    "NaN coordinate": lambda d, k: d.assign_coords(x=np.r_[np.nan, d.x.values[1:]]),
    "transposed": lambda d, k: d.transpose("trajectory", "time", "x", "y"),
    "trajectory not first": lambda d, k: d.transpose("time", "y", "trajectory", "x"),
    "two times": lambda d, k: xr.concat([d, d.assign_coords(time=d.time + 1)], "time", data_vars="all"),
    "no time dimension": lambda d, k: d.isel(time=0),
    "zero trajectories": lambda d, k: d.isel(trajectory=slice(0, 0)),
    "one trajectory": lambda d, k: d.isel(trajectory=[k % 3]),
    "no trajectory dimension": lambda d, k: d.isel(trajectory=k % 3),
    "empty grid": lambda d, k: d.isel(y=slice(0, 0)),
    "extra dimension": lambda d, k: d.expand_dims(level=2),
    "scattered points": lambda d, k: d.isel(time=0).stack(point=("y", "x")).reset_index("point"),
    "scattered points, shuffled": lambda d, k: d.isel(time=0).stack(point=("y", "x")).reset_index("point").isel(point=np.random.default_rng(k).permutation(64)),
    "scattered points, duplicated": lambda d, k: d.isel(time=0).stack(point=("y", "x")).reset_index("point").isel(point=[0, k % 64, k % 64]),
    "scattered points without coordinates": lambda d, k: d.isel(time=0).stack(point=("y", "x")).reset_index("point").drop_vars(["x"]),
}
TIMES = st.one_of(
    st.sampled_from(VALID_TIMES),
    st.sampled_from([None, [], [[0.0, 1.0]], [1.0, 0.0], [0.0, 0.0], [-1.0], [np.nan], [np.inf], [0.0, 1e9], "abc", ["1"], [1j]]),
    st.just(np.array([0, 1], dtype="timedelta64[h]")),
)


# Derandomized, so CI sees the same 80 draws every run; a wider random search: raise max_examples, drop derandomize.
@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=st.sampled_from(sorted(MUTATIONS)), second=st.sampled_from(sorted(MUTATIONS)), k=st.integers(0, 10_000), times=TIMES)
def test_malformed_inputs_give_a_clear_error_or_a_correct_forecast(forecaster, initial, first, second, k, times):
    try:
        ds = MUTATIONS[second](MUTATIONS[first](initial, k), k + 1)
    except (ValueError, KeyError, TypeError, IndexError):
        return  # the two mutations do not compose (e.g. a transpose after a dimension was removed)
    try:
        out = forecaster.forecast(ds, times)
    except (ValueError, TypeError, KeyError) as error:
        assert type(error).__module__ == "builtins" or type(error).__module__.startswith("enfpde"), type(error)
        message = str(error.args[0] if error.args else error)
        assert len(message) > 20 and "Traceback" not in message, message  # says what was found and expected
        return
    n = ds.sizes.get("trajectory", 1)
    t = np.size(times)
    space = ("point",) if "point" in ds.dims else ("y", "x")
    assert out.u.dims == ("trajectory", "time", *space)
    assert out.u.shape[:2] == (n, t)
    assert np.isfinite(out.u.values).all()
