"""ERA5 data (enfpde.data.era5): every source format read into one layout, selection, normalisation, windows, files.

The reference data is the real ERA5 sample beside the project (10 members, z and t at 850/500 hPa, 4 times,
3-degree grid), read in place. Without it a synthetic stand-in with the same messages (GRIB1, 10 members, same
grid, levels and times; smooth latitude-dependent fields plus noise) is written to a temporary GRIB file with
eccodes, so every test, the GRIB ones included, runs on a fresh clone. Without cfgrib/eccodes (the ``grib``
extra) the stand-in is built in memory and only the GRIB tests skip. The fixtures write the reference data the
way each source lays it out (CDS netCDF new and old, a WeatherBench2-style zarr, GRIB split per time), and every
reader must give back the same canonical arrays.

Where the sample is looked for: ``ENFPDE_ERA5_SAMPLE`` when set (only there: ``ENFPDE_ERA5_SAMPLE=none``, or any
path that is not a file, means "no sample" and selects the synthetic GRIB), else ``<repo>/../shared/data/`` and
``/work/shared/data/`` (``era5-levels-members.grib``). To run the CI configuration here:
``ENFPDE_ERA5_SAMPLE=none pytest tests/test_era5_data.py``.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from pathlib import Path

import numpy as np
import yaml
import pytest
import xarray as xr

from enfpde.data import dataset_generator
from enfpde.data import era5
from enfpde.data import generate_dataset as generate_any
from enfpde.data.trajectories import TrajectoryDataset

REPO = Path(__file__).resolve().parents[1]
SAMPLE_NAME = "era5-levels-members.grib"
UNITS = {"z": "m**2 s**-2", "t": "K"}  # as cfgrib and the CDS write them
LONG = {"z": "geopotential", "t": "temperature"}
TIMES = np.array(["2017-01-01T00", "2017-01-01T12", "2017-01-02T00", "2017-01-02T12"], "datetime64[ns]")


def _sample_path() -> Path | None:
    """The real sample, or None: ENFPDE_ERA5_SAMPLE alone when set ('none' or a missing file: no sample)."""
    env = os.environ.get("ENFPDE_ERA5_SAMPLE", "").strip()
    if env:
        path = Path(env).expanduser()
        return path if env.lower() != "none" and path.is_file() else None
    candidates = [REPO.parent / "shared" / "data" / SAMPLE_NAME, Path("/work/shared/data") / SAMPLE_NAME]
    return next((p for p in candidates if p.is_file()), None)


SAMPLE = _sample_path()


@functools.cache
def _grib_missing() -> str | None:
    """Why GRIB cannot be read or written here (None: cfgrib and eccodes import)."""
    try:
        for module in ("eccodes", "cfgrib"):
            importlib.import_module(module)
    except Exception as error:  # ImportError, or eccodes' RuntimeError when its binary library is missing
        return f"GRIB needs the 'grib' extra, pip install 'enfpde[grib]' (cfgrib, eccodes): {type(error).__name__}: {error}"
    return None


def _synthetic_raw() -> xr.Dataset:
    """Smooth fields plus noise on the sample's grid and axes, in cfgrib's layout. Physically ordered like the real
    data: 500 hPa is higher than 850 hPa everywhere, and it is colder at the poles than at the equator."""
    rng = np.random.default_rng(0)
    lat, lon = np.arange(90.0, -90.1, -3.0), np.arange(0.0, 360.0, 3.0)
    shape = (10, 4, 2, lat.size, lon.size)  # number, time, level (850, 500), latitude, longitude
    coslat = np.cos(np.deg2rad(lat))[:, None] + 0 * lon[None, :]
    wave = np.cos(np.deg2rad(lat))[:, None] * np.sin(np.deg2rad(2 * lon))[None, :]
    by_level = lambda a850, a500: np.array([a850, a500])[:, None, None]  # noqa: E731
    z = by_level(1.2e4, 5.0e4) + by_level(2e3, 6e3) * coslat + 500 * wave + 50 * rng.standard_normal(shape)
    t = by_level(250.0, 230.0) + by_level(40.0, 25.0) * coslat + 3 * wave + rng.standard_normal(shape)
    return _raw(z.astype(np.float32), t.astype(np.float32), np.arange(10), TIMES, lat, lon)


def _raw(z, t, numbers, times, lat, lon) -> xr.Dataset:
    dims = ("number", "time", "isobaricInhPa", "latitude", "longitude")
    return xr.Dataset(
        {"z": (dims, z, {"units": UNITS["z"], "long_name": "Geopotential"}), "t": (dims, t, {"units": UNITS["t"], "long_name": "Temperature"})},
        coords={"number": numbers, "time": times, "isobaricInhPa": [850.0, 500.0], "latitude": lat, "longitude": lon},
    )


def write_grib(raw: xr.Dataset, path: Path) -> Path:
    """``raw`` (cfgrib's layout, regular latitude-longitude grid) as GRIB1 messages the way the ERA5 sample has them:
    ECMWF local definition 1 (class ea, stream enda, type an), one message per time, level, variable and member,
    latitude from north to south, 16-bit simple packing (so values come back rounded: read the file to compare)."""
    import eccodes

    lat, lon = raw.latitude.values, raw.longitude.values
    grid = {
        "Ni": lon.size, "Nj": lat.size, "latitudeOfFirstGridPointInDegrees": float(lat[0]),
        "latitudeOfLastGridPointInDegrees": float(lat[-1]), "longitudeOfFirstGridPointInDegrees": float(lon[0]),
        "longitudeOfLastGridPointInDegrees": float(lon[-1]), "iDirectionIncrementInDegrees": float(lon[1] - lon[0]),
        "jDirectionIncrementInDegrees": float(abs(lat[1] - lat[0])), "jScansPositively": int(lat[1] > lat[0]),
    }
    numbers = raw.number.values if "number" in raw.dims else [None]
    template = eccodes.codes_grib_new_from_samples("regular_ll_pl_grib1")
    try:
        for key, value in {"centre": "ecmf", "class": "ea", "type": "an", "stream": "enda" if numbers[0] is not None else "oper",
                           "typeOfLevel": "isobaricInhPa", "stepRange": "0", "bitsPerValue": 16, **grid}.items():
            (eccodes.codes_set_string if isinstance(value, str) else eccodes.codes_set)(template, key, value)
        if numbers[0] is not None:
            eccodes.codes_set(template, "numberOfForecastsInEnsemble", len(numbers))
        with open(path, "wb") as target:
            for time in raw.time.values:
                stamp = np.datetime_as_string(time, unit="m")  # 2017-01-01T12:00
                date, hhmm = int(stamp[:10].replace("-", "")), int(stamp[11:].replace(":", ""))
                for level in raw.isobaricInhPa.values:
                    for name in raw.data_vars:
                        for number in numbers:
                            message = eccodes.codes_clone(template)
                            eccodes.codes_set_string(message, "shortName", str(name))
                            for key, value in (("level", int(level)), ("dataDate", date), ("dataTime", hhmm)):
                                eccodes.codes_set(message, key, value)
                            where = {"time": time, "isobaricInhPa": level}
                            if number is not None:
                                eccodes.codes_set(message, "number", int(number))
                                where["number"] = number
                            values = raw[name].sel(where).transpose("latitude", "longitude").values
                            eccodes.codes_set_values(message, np.asarray(values, np.float64).ravel())
                            eccodes.codes_write(message, target)
                            eccodes.codes_release(message)
    finally:
        eccodes.codes_release(template)
    return path


@pytest.fixture(scope="module")
def grib_source(tmp_path_factory) -> Path | None:
    """The real sample; else the synthetic stand-in written as GRIB; None when GRIB cannot be handled here."""
    if _grib_missing() is not None:
        return None
    if SAMPLE is not None:
        return SAMPLE
    return write_grib(_synthetic_raw(), tmp_path_factory.mktemp("synthetic_grib") / SAMPLE_NAME)


@pytest.fixture(scope="module")
def sample(grib_source) -> Path:
    """The GRIB reference file (real or synthetic); skips without cfgrib/eccodes."""
    if grib_source is None:
        pytest.skip(_grib_missing())
    return grib_source


@pytest.fixture(scope="module")
def raw(grib_source) -> xr.Dataset:
    """The reference data in cfgrib's layout (levels 850, 500; latitude 90 -> -90), in memory: the GRIB file as
    cfgrib reads it, or without cfgrib the synthetic stand-in itself."""
    if grib_source is None:
        return _synthetic_raw()
    with xr.open_dataset(grib_source, engine="cfgrib", backend_kwargs={"indexpath": ""}) as ds:
        return _raw(ds.z.values, ds.t.values, ds.number.values, ds.time.values, ds.latitude.values, ds.longitude.values)


@pytest.fixture(scope="module")
def expected(raw) -> dict[str, np.ndarray]:
    """The canonical arrays, derived by hand: levels ascending (500, 850), latitude ascending (south first)."""
    return {v: raw[v].values[:, :, ::-1, ::-1, :] for v in ("z", "t")}


# ------------------------------------------------------------------------------------------------ writers


def write_cds_new(raw: xr.Dataset, path: Path) -> Path:
    """A CDS netCDF as served since 2024: valid_time, pressure_level, number, an expver coordinate."""
    ds = raw.rename({"time": "valid_time", "isobaricInhPa": "pressure_level"})
    ds = ds.assign_coords(expver=("valid_time", np.array(["0001"] * ds.sizes["valid_time"])))
    ds["pressure_level"].attrs["units"] = "hPa"
    ds.to_netcdf(path)
    return path


def write_cds_old(raw: xr.Dataset, path: Path) -> Path:
    """A pre-2024 CDS netCDF of one member (no ensemble axis): time, level (int, millibars)."""
    ds = raw.isel(number=0, drop=True).rename({"isobaricInhPa": "level"})
    ds = ds.assign_coords(level=("level", ds["level"].values.astype(np.int32), {"units": "millibars"}))
    ds.to_netcdf(path)
    return path


def write_wb2(raw: xr.Dataset, path: Path) -> Path:
    """A WeatherBench2-style zarr: long names, level and latitude ascending, member axis after time."""
    ds = raw.rename({"number": "member", "isobaricInhPa": "level", **LONG}).sortby("level").sortby("latitude")
    ds = ds.transpose("time", "member", "level", "latitude", "longitude")
    ds.to_zarr(path, mode="w", zarr_format=2, consolidated=True)
    return path


@pytest.fixture(scope="module")
def files(raw, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("era5")
    out = {
        "cds_new": write_cds_new(raw, root / "cds_new.nc"),
        "cds_old": write_cds_old(raw, root / "cds_old.nc"),
        "wb2_zarr": write_wb2(raw, root / "wb2.zarr"),
    }
    # A directory of daily netCDF files, written in reverse order of their names to test the time sort.
    (root / "nc_dir").mkdir()
    write_cds_new(raw.isel(time=slice(2, 4)), root / "nc_dir" / "a_day2.nc")
    write_cds_new(raw.isel(time=slice(0, 2)), root / "nc_dir" / "b_day1.nc")
    (root / "nc_dir" / "README.txt").write_text("not data")
    out["nc_dir"] = root / "nc_dir"
    return out


@pytest.fixture(scope="module")
def grib_dir(sample, tmp_path_factory) -> Path:
    """The sample's GRIB messages copied by eccodes into one file per time (cfgrib reads a scalar time)."""
    import eccodes  # the sample fixture has checked that it imports

    root = tmp_path_factory.mktemp("grib_dir")
    with open(sample, "rb") as source:
        while (message := eccodes.codes_grib_new_from_file(source)) is not None:
            name = f"era5_{eccodes.codes_get(message, 'dataDate')}_{eccodes.codes_get(message, 'dataTime'):04d}.grib"
            with open(root / name, "ab") as target:
                eccodes.codes_write(message, target)
            eccodes.codes_release(message)
    return root


@pytest.fixture(scope="module")
def ds(files) -> xr.Dataset:
    """The canonical reference data (all members), read from the new-layout CDS netCDF file."""
    return era5.open_era5(files["cds_new"])


# ------------------------------------------------------------------------------------------------ reading


def _check_canonical(ds: xr.Dataset, expected: dict[str, np.ndarray], raw: xr.Dataset, members: bool = True) -> None:
    assert list(ds.data_vars) == ["z", "t"]
    dims = ("member",) * members + ("time", "level", "latitude", "longitude")
    for v in ("z", "t"):
        assert ds[v].dims == dims
        want = expected[v] if members else expected[v][0]
        np.testing.assert_array_equal(ds[v].values, want)
        assert ds[v].attrs == {"long_name": era5.VARIABLES[v].long.replace("_", " "), "units": era5.VARIABLES[v].units}
    np.testing.assert_array_equal(ds.level.values, [500, 850])
    assert ds.level.dtype == np.int64
    np.testing.assert_array_equal(ds.latitude.values, np.arange(-90.0, 90.1, 3.0))
    np.testing.assert_array_equal(ds.longitude.values, np.arange(0.0, 360.0, 3.0))
    np.testing.assert_array_equal(ds.time.values, raw.time.values)
    assert ds.time.dtype == np.dtype("datetime64[ns]")
    if members:
        np.testing.assert_array_equal(ds.member.values, np.arange(10))
    assert set(ds.coords) == set(dims)  # step, valid_time, expver, number ... are gone


@pytest.mark.parametrize("kind", ["cds_new", "cds_old", "wb2_zarr", "nc_dir"])
def test_formats_read_into_the_canonical_layout(kind, files, expected, raw):
    ds = era5.open_era5(files[kind])
    _check_canonical(ds, expected, raw, members=kind != "cds_old")


def test_grib_netcdf_and_zarr_give_identical_arrays(sample, files, grib_dir):
    grib = era5.open_era5(sample)
    assert grib.attrs["era5_format"] == "grib"
    for other in (era5.open_era5(files["cds_new"]), era5.open_era5(files["wb2_zarr"]), era5.open_era5(grib_dir)):
        xr.testing.assert_identical(grib.drop_attrs(), other.drop_attrs())
        for v in ("z", "t"):
            np.testing.assert_array_equal(grib[v].values, other[v].values)


def test_grib_mixing_level_types_keeps_every_field(sample, tmp_path):
    """cfgrib's xr.open_dataset would drop the surface fields of a file that starts with pressure levels."""
    import eccodes

    path = tmp_path / "mixed.grib"
    with open(sample, "rb") as source, open(path, "wb") as target:
        while (message := eccodes.codes_grib_new_from_file(source)) is not None:
            get = lambda key: eccodes.codes_get(message, key)  # noqa: E731
            if get("shortName") == "z" and get("level") == 500 and get("dataTime") == 0 and get("dataDate") == 20170101:
                eccodes.codes_write(message, target)
                surface = eccodes.codes_clone(message)  # the same values, relabelled as 2 m temperature
                eccodes.codes_set(surface, "typeOfLevel", "surface")
                eccodes.codes_set(surface, "paramId", 167)
                eccodes.codes_write(surface, target)
                eccodes.codes_release(surface)
            eccodes.codes_release(message)
    ds = era5.open_era5(path)
    assert sorted(ds.data_vars) == ["t2m", "z"]
    assert ds.z.dims == ("member", "time", "level", "latitude", "longitude") and ds.t2m.dims == ("member", "time", "latitude", "longitude")
    np.testing.assert_array_equal(ds.t2m.values, ds.z.values[:, :, 0])


def test_grib_sample_is_the_documented_data(sample):
    ds = era5.open_era5(sample)
    assert dict(ds.sizes) == {"member": 10, "time": 4, "level": 2, "latitude": 61, "longitude": 120}
    assert ds.time.values[0] == np.datetime64("2017-01-01T00") and ds.time.values[-1] == np.datetime64("2017-01-02T12")
    # Physical sanity of the canonical orientation: 500 hPa is higher and colder than 850 hPa, the poles are colder.
    z500, z850 = ds.z.sel(level=500).values, ds.z.sel(level=850).values
    assert np.all(z500 > z850)
    t850 = ds.t.sel(level=850).mean(("member", "time", "longitude")).values
    assert t850[30] > t850[0] + 20 and t850[30] > t850[-1] + 20  # equator vs south and north pole


def test_longitudes_from_minus_180_are_wrapped_and_sorted(raw, expected, tmp_path):
    shifted = raw.assign_coords(longitude=np.where(raw.longitude > 179, raw.longitude - 360, raw.longitude)).sortby("longitude")
    ds = era5.open_era5(write_cds_new(shifted, tmp_path / "shifted.nc"))
    np.testing.assert_array_equal(ds.longitude.values, np.arange(0.0, 360.0, 3.0))
    np.testing.assert_array_equal(ds.z.values, expected["z"])


def test_expver_axis_of_old_cds_files_is_merged(raw, expected, tmp_path):
    """Old CDS files mixing ERA5 (expver 1) and ERA5T (expver 5) hold each time in one version, NaN in the other."""
    one = raw.isel(number=0, drop=True).rename({"isobaricInhPa": "level"})
    first, second = one.copy(deep=True), one.copy(deep=True)
    first["z"][2:] = np.nan
    second["z"][:2] = np.nan
    mixed = xr.concat([first, second], dim=xr.DataArray([1, 5], dims="expver", name="expver"))
    ds = era5.open_era5(write_cds_old_like(mixed, tmp_path / "expver.nc"))
    assert "expver" not in ds.dims and "expver" not in ds.coords
    np.testing.assert_array_equal(ds.z.values, expected["z"][0])


def write_cds_old_like(ds: xr.Dataset, path: Path) -> Path:
    ds.to_netcdf(path)
    return path


def test_single_level_and_static_variables(tmp_path):
    """Long names map to short ones, single-level variables get no level axis, static fields are set aside."""
    lat, lon = np.arange(-90.0, 90.1, 30.0), np.arange(0.0, 360.0, 60.0)
    times = np.array(["2020-01-01T00", "2020-01-01T06"], "datetime64[ns]")
    rng = np.random.default_rng(1)
    wb2 = xr.Dataset(
        {
            "2m_temperature": (("time", "latitude", "longitude"), rng.normal(280, 5, (2, 7, 6)).astype(np.float32), {"units": "K"}),
            "geopotential": (("time", "level", "latitude", "longitude"), rng.normal(5e4, 100, (2, 2, 7, 6)).astype(np.float32), {"units": "m**2 s**-2"}),
            "land_sea_mask": (("latitude", "longitude"), np.zeros((7, 6), np.float32)),
        },
        coords={"time": times, "level": [500, 1000], "latitude": lat, "longitude": lon},
    )
    wb2.to_zarr(tmp_path / "wb2.zarr", zarr_format=2, consolidated=True)
    ds = era5.open_era5(tmp_path / "wb2.zarr")
    assert list(ds.data_vars) == ["t2m", "z"] and ds.t2m.dims == ("time", "latitude", "longitude")
    assert ds.attrs["static_variables"] == "lsm"
    with pytest.raises(era5.Era5Error, match="'land_sea_mask'.*static field"):
        era5.select(ds, era5.Era5Selection(variables=["land_sea_mask"]))
    fields = era5.to_fields(era5.select(ds, era5.Era5Selection(variables=["2m_temperature", "z"], levels=[1000])))
    assert list(fields.data_vars) == ["t2m", "z1000"]
    np.testing.assert_array_equal(fields.t2m.values, wb2["2m_temperature"].values)
    assert "level" not in fields.t2m.attrs and fields.z1000.attrs["level"] == 1000


# ------------------------------------------------------------------------------------------------ reading errors


def test_missing_path_and_unknown_file_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ERA5 data at"):
        era5.open_era5(tmp_path / "absent.grib")
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(era5.Era5Error, match=r"unknown file type '\.csv'.*expected GRIB"):
        era5.open_era5(tmp_path / "data.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(era5.Era5Error, match="holds no netCDF"):
        era5.open_era5(tmp_path / "empty")


def test_grib_without_cfgrib_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "x.grib").write_bytes(b"GRIB")
    monkeypatch.setitem(sys.modules, "cfgrib", None)  # makes `import cfgrib` fail
    with pytest.raises(ImportError, match=r"pip install 'enfpde\[grib\]'"):
        era5.open_era5(tmp_path / "x.grib")


@pytest.mark.parametrize(
    "order, message",
    [([0, 2, 1, 3], "strictly increasing; found times out of order: 2017-01-02T00:00:00 followed by 2017-01-01T12:00:00"),
     ([0, 1, 1, 3], "strictly increasing; found a duplicated time: 2017-01-01T12:00:00 followed by 2017-01-01T12:00:00")],
)
def test_single_file_with_unsorted_or_duplicated_times_raises(raw, tmp_path, order, message):
    path = write_cds_new(raw.isel(time=order, number=[0]), tmp_path / "bad.nc")
    with pytest.raises(era5.Era5Error, match=message):
        era5.open_era5(path)


def test_directory_with_overlapping_files_raises(raw, tmp_path):
    write_cds_new(raw.isel(time=[0, 1], number=[0]), tmp_path / "a.nc")
    write_cds_new(raw.isel(time=[1, 2], number=[0]), tmp_path / "b.nc")
    with pytest.raises(era5.Era5Error, match="files overlap in time: 'a.nc' ends at 2017-01-01T12:00:00 and 'b.nc' starts"):
        era5.open_era5(tmp_path)


def test_directory_of_pressure_level_and_single_level_downloads_is_merged(raw, tmp_path):
    """The CDS serves pressure-level and single-level variables as separate downloads of the same period."""
    levels = raw.isel(number=[0])
    write_cds_new(levels.isel(time=[0, 1]), tmp_path / "pl_day1.nc")
    write_cds_new(levels.isel(time=[2, 3]), tmp_path / "pl_day2.nc")
    t2m = (levels["t"].sel(isobaricInhPa=850, drop=True) + 5.0).rename("t2m")
    single = xr.Dataset({"t2m": t2m.assign_attrs(units="K")}).rename({"time": "valid_time"})
    single.to_netcdf(tmp_path / "sl_all.nc")
    ds = era5.open_era5(tmp_path)
    assert sorted(ds.data_vars) == ["t", "t2m", "z"] and ds.sizes["time"] == 4
    np.testing.assert_array_equal(ds["t2m"].values[0], t2m.values[0, :, ::-1])  # member 0, latitude flipped
    short = tmp_path / "short"  # the single-level download one time short of the pressure-level ones
    short.mkdir()
    write_cds_new(levels, short / "pl.nc")
    single.isel(valid_time=[0, 1, 2]).to_netcdf(short / "sl.nc")
    with pytest.raises(era5.Era5Error, match=r"different sets of variables \[\['t', 'z'\], \['t2m'\]\]"):
        era5.open_era5(short)


def _small(raw):
    return raw.isel(number=[0], time=[0, 1], latitude=slice(0, 5), longitude=slice(0, 6))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.rename({"latitude": "y", "longitude": "x"}), "no latitude/longitude coordinates"),
        (lambda d: d.rename({"latitude": "j", "longitude": "i"}).assign_coords(
            latitude=(("j", "i"), np.zeros((5, 6))), longitude=(("j", "i"), np.zeros((5, 6)))),
         r"'latitude' has dimensions \('j', 'i'\); expected a regular latitude-longitude grid"),
        (lambda d: d.assign_coords(latitude=[90.0, 87.0, 84.0, 80.0, 77.0]), "latitude is irregularly spaced"),
        (lambda d: d.assign_coords(longitude=[0.0, 3.0, 9.0, 6.0, 12.0, 15.0]), "longitude is not sorted"),
        (lambda d: d.assign_coords(latitude=[99.0, 96.0, 93.0, 90.0, 87.0]), r"leave \[-90, 90\]"),
    ],
    ids=["no-latlon", "2d-latlon", "irregular", "unsorted", "beyond-pole"],
)
def test_unreadable_grids_raise(raw, tmp_path, change, message):
    path = write_cds_new(change(_small(raw)), tmp_path / "grid.nc")
    with pytest.raises(era5.Era5Error, match=message):
        era5.open_era5(path)


def test_units_contradicting_era5_raise(raw, tmp_path):
    ds = _small(raw)
    ds["z"].attrs["units"] = "m"  # geopotential height, not geopotential
    with pytest.raises(era5.Era5Error, match="'z' has units 'm'; ERA5 geopotential is in 'm2 s-2'"):
        era5.open_era5(write_cds_new(ds, tmp_path / "units.nc"))


# ------------------------------------------------------------------------------------------------ selection


def test_variables_by_short_or_long_name(ds):
    by_long = era5.select(ds, era5.Era5Selection(variables=["temperature", "geopotential"]))
    by_short = era5.select(ds, era5.Era5Selection(variables=["t", "z"]))
    assert list(by_long.data_vars) == ["t", "z"]
    xr.testing.assert_identical(by_long, by_short)
    with pytest.raises(era5.Era5Error, match=r"variable 'u10' is not in .*; it has \['z \(geopotential\)', 't \(temperature\)'\]"):
        era5.select(ds, era5.Era5Selection(variables=["z", "u10"]))
    with pytest.raises(era5.Era5Error, match="same variable twice"):
        era5.select(ds, era5.Era5Selection(variables=["z", "geopotential"]))


def test_levels(ds, expected):
    out = era5.select(ds, era5.Era5Selection(levels=[850]))
    np.testing.assert_array_equal(out.level.values, [850])
    np.testing.assert_array_equal(out.z.values[:, :, 0], expected["z"][:, :, 1])
    with pytest.raises(era5.Era5Error, match=r"pressure level\(s\) \[700\] hPa not in .*; it has \[500, 850\] hPa"):
        era5.select(ds, era5.Era5Selection(levels=[500, 700]))


def test_members(ds, files, expected):
    out = era5.select(ds, era5.Era5Selection(members=[7, 3]))
    np.testing.assert_array_equal(out.member.values, [7, 3])
    np.testing.assert_array_equal(out.t.values, expected["t"][[7, 3]])
    with pytest.raises(era5.Era5Error, match=r"ensemble member\(s\) \[12\] not in .*; it has \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\]"):
        era5.select(ds, era5.Era5Selection(members=[0, 12]))
    with pytest.raises(era5.Era5Error, match=r"members \[0\] were given but .*cds_old.nc has no ensemble members"):
        era5.select(era5.open_era5(files["cds_old"]), era5.Era5Selection(members=[0]))


def test_time_range_is_inclusive_and_stride_keeps_every_kth(ds, raw):
    out = era5.select(ds, era5.Era5Selection(start="2017-01-01T12", end=np.datetime64("2017-01-02T12")))
    np.testing.assert_array_equal(out.time.values, raw.time.values[1:])
    out = era5.select(ds, era5.Era5Selection(stride=2))
    np.testing.assert_array_equal(out.time.values, raw.time.values[[0, 2]])
    out = era5.select(ds, era5.Era5Selection(start="2017-01-01T12:00Z", stride=2))
    np.testing.assert_array_equal(out.time.values, raw.time.values[[1, 3]])


@pytest.mark.parametrize(
    "start, end, message",
    [("2016-12-31T00", None, "time range 2016-12-31T00:00:00..2017-01-02T12:00:00 is not within the data"),
     (None, "2017-01-03", "is not within the data: .* has 4 times from 2017-01-01T00:00:00 to 2017-01-02T12:00:00"),
     ("2017-01-01T01", "2017-01-01T11", "no time in 2017-01-01T01:00:00..2017-01-01T11:00:00: .* has 4 times from")],
)
def test_times_outside_the_data_raise(ds, start, end, message):
    with pytest.raises(era5.Era5Error, match=message):
        era5.select(ds, era5.Era5Selection(start=start, end=end))


def test_latitude_box(ds, expected):
    out = era5.select(ds, era5.Era5Selection(lat_range=(30, 60)))
    np.testing.assert_array_equal(out.latitude.values, np.arange(30.0, 60.1, 3.0))
    np.testing.assert_array_equal(out.z.values, expected["z"][..., 40:51, :])
    with pytest.raises(era5.Era5Error, match=r"lat_range \(1, 2\) holds no grid latitude .* 61 latitudes from -90.0 to 90.0"):
        era5.select(ds, era5.Era5Selection(lat_range=(1, 2)))


@pytest.mark.parametrize("lon_range", [(350, 20), (-10, 20), (710, 20)])
def test_longitude_box_across_greenwich_is_contiguous(ds, expected, lon_range):
    out = era5.select(ds, era5.Era5Selection(lon_range=lon_range))
    np.testing.assert_array_equal(out.longitude.values, np.arange(-9.0, 18.1, 3.0))  # 351 .. 357 become -9 .. -3
    want = np.concatenate([expected["t"][..., 117:], expected["t"][..., :7]], axis=-1)
    np.testing.assert_array_equal(out.t.values, want)


def test_longitude_box_plain_and_global_and_empty(ds, expected):
    out = era5.select(ds, era5.Era5Selection(lon_range=(90, 180)))
    np.testing.assert_array_equal(out.longitude.values, np.arange(90.0, 180.1, 3.0))
    np.testing.assert_array_equal(out.z.values, expected["z"][..., 30:61])
    for whole in ((0, 360), (-180, 180)):
        assert era5.select(ds, era5.Era5Selection(lon_range=whole)).sizes["longitude"] == 120
    with pytest.raises(era5.Era5Error, match=r"lon_range \(1, 2\) holds no grid longitude"):
        era5.select(ds, era5.Era5Selection(lon_range=(1, 2)))


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6])
def test_coarsen_subsamples_and_keeps_both_poles(ds, expected, k):
    out = era5.select(ds, era5.Era5Selection(coarsen=k))
    assert out.latitude.values[0] == -90 and out.latitude.values[-1] == 90
    np.testing.assert_allclose(np.diff(out.latitude.values), 3.0 * k)
    assert out.sizes["longitude"] * 3.0 * k == 360
    np.testing.assert_array_equal(out.z.values, expected["z"][..., ::k, ::k])


def test_coarsen_that_breaks_the_grid_raises(ds):
    with pytest.raises(era5.Era5Error, match=r"coarsen=7 would drop the north pole: .* must divide 60: one of \[1, 2, 3, 4, 5, 6, 10"):
        era5.select(ds, era5.Era5Selection(coarsen=7))
    with pytest.raises(era5.Era5Error, match="coarsen=7 does not divide the 120 longitudes of the global grid"):
        era5.select(ds, era5.Era5Selection(lat_range=(0, 30), coarsen=7))
    out = era5.select(ds, era5.Era5Selection(lat_range=(0, 30), lon_range=(0, 30), coarsen=7))  # regional: from the SW corner
    np.testing.assert_array_equal(out.latitude.values, [0.0, 21.0])
    np.testing.assert_array_equal(out.longitude.values, [0.0, 21.0])


@pytest.mark.parametrize(
    "kwargs, message",
    [({"stride": 0}, "stride: expected an integer >= 1"), ({"coarsen": 1.5}, "coarsen: expected an integer >= 1"),
     ({"lat_range": (60, 30)}, r"lat_range: expected \(south, north\)"), ({"variables": "z"}, "variables: expected a list"),
     ({"start": "2017-01-02", "end": "2017-01-01"}, "start '2017-01-02' is after end"), ({"start": "soon"}, "cannot read 'soon' as a time")],
)
def test_invalid_selections_raise(kwargs, message):
    with pytest.raises(era5.Era5Error, match=message):
        era5.Era5Selection(**kwargs)


def test_levels_without_pressure_level_variables_raise(tmp_path):
    ds = xr.Dataset(
        {"msl": (("time", "latitude", "longitude"), np.ones((2, 3, 4), np.float32), {"units": "Pa"})},
        coords={"time": np.array(["2020-01-01", "2020-01-02"], "datetime64[ns]"), "latitude": [0.0, 1.0, 2.0], "longitude": [0.0, 1.0, 2.0, 3.0]},
    )
    ds.to_netcdf(tmp_path / "msl.nc")
    with pytest.raises(era5.Era5Error, match=r"levels \[500\] were given but no selected variable .* has pressure levels"):
        era5.select(era5.open_era5(tmp_path / "msl.nc"), era5.Era5Selection(levels=[500]))


# ------------------------------------------------------------------------------------------------ fields, normalisation, windows


def test_to_fields_flattens_levels(ds, expected):
    fields = era5.to_fields(era5.select(ds, era5.Era5Selection(variables=["t", "z"], levels=[850, 500])))
    assert list(fields.data_vars) == ["t850", "t500", "z850", "z500"]
    for name, v, level in (("t850", "t", 1), ("z500", "z", 0)):
        da = fields[name]
        assert da.dims == ("member", "time", "latitude", "longitude") and da.dtype == np.float32
        np.testing.assert_array_equal(da.values, expected[v][:, :, level])
    assert fields.z500.attrs == {"long_name": "geopotential at 500 hPa", "units": "m2 s-2", "level": 500, "level_units": "hPa"}


def test_normalization_is_mean_and_std_over_everything(ds, expected):
    fields = era5.to_fields(ds)
    stats = era5.normalization(fields)
    assert list(stats) == ["z500", "z850", "t500", "t850"]
    values = expected["t"][:, :, 1].astype(np.float64)
    np.testing.assert_allclose([stats["t850"]["mean"], stats["t850"]["std"]], [values.mean(), values.std()], rtol=1e-7)  # float64 accumulation over float32 data
    stored = era5.attach_normalization(fields, stats)
    assert era5.read_normalization(stored) == stats
    assert fields.z500.attrs.get("normalization_mean") is None  # the input is not modified
    with pytest.raises(era5.Era5Error, match="has no 'normalization' attribute"):
        era5.read_normalization(fields)
    with pytest.raises(era5.Era5Error, match="do not match the fields"):
        era5.attach_normalization(fields, {"z500": stats["z500"]})
    normalizer = era5.normalizer(stats, ["t850", "z500"])
    np.testing.assert_allclose(normalizer.mean, [stats["t850"]["mean"], stats["z500"]["mean"]], rtol=1e-6)
    constant = fields[["t850"]].copy(deep=True)
    constant["t850"][:] = 1.0
    with pytest.raises(era5.Era5Error, match="'t850': it is constant"):
        era5.normalization(constant)


def test_windows_frames_and_order(ds, expected, raw):
    fields = era5.to_fields(ds)
    out = era5.windows(fields, lead_hours=12, num_frames=2)
    assert out.z500.dims == ("trajectory", "time", "latitude", "longitude")
    assert out.sizes["trajectory"] == 3 * 10  # starts 01T00, 01T12, 02T00 (02T12 has no next frame) x 10 members
    np.testing.assert_array_equal(out.time.values, [0.0, 12.0])
    assert out.time.attrs["units"] == "hours"
    z500 = expected["z"][:, :, 0]
    for n in (0, 13, 29):
        start, member = divmod(n, 10)  # start-major, then member
        assert out.member.values[n] == member and out.init_time.values[n] == raw.time.values[start]
        np.testing.assert_array_equal(out.z500.values[n], z500[member, start : start + 2])
        np.testing.assert_array_equal(out.valid_time.values[n], raw.time.values[start : start + 2])


@pytest.mark.parametrize(
    "lead, frames, every, starts",
    [(24, 2, None, [0]), (24, 2, 12, [0, 1]), (12, 3, 24, [0]), (12, 1, 12, [0, 1, 2, 3]), (36, 2, None, [0])],
)
def test_windows_start_times(ds, raw, lead, frames, every, starts):
    out = era5.windows(era5.to_fields(era5.select(ds, era5.Era5Selection(members=[4]))), lead, frames, every)
    np.testing.assert_array_equal(out.init_time.values, raw.time.values[starts])
    np.testing.assert_array_equal(out.time.values, np.arange(frames) * lead)


def test_windows_skip_gaps_and_work_without_members(files, raw):
    fields = era5.to_fields(era5.open_era5(files["cds_old"]).isel(time=[0, 1, 3]))
    out = era5.windows(fields, 12, 2)
    np.testing.assert_array_equal(out.init_time.values, raw.time.values[[0]])  # 01T12 -> 02T00 is missing
    assert "member" not in out.coords and out.sizes["trajectory"] == 1


def test_windows_errors_say_what_the_times_are(ds):
    fields = era5.to_fields(ds)
    with pytest.raises(era5.Era5Error, match="lead_hours=6 is not a multiple of the time spacing of the data: 4 times from .* every 12 h"):
        era5.windows(fields, 6, 2)
    with pytest.raises(era5.Era5Error, match="start_every_hours=18 is not a multiple"):
        era5.windows(fields, 12, 2, 18)
    with pytest.raises(era5.Era5Error, match="no window of 5 frames 12 h apart .* fits in the 4 times from 2017-01-01T00:00:00 to 2017-01-02T12:00:00 every 12 h"):
        era5.windows(fields, 12, 5)


# ------------------------------------------------------------------------------------------------ config and files


def _config(source, **changes) -> dict:
    config = {
        "generator": "era5", "name": "tiny_era5", "source": str(source), "variables": ["z", "temperature"], "levels": [500, 850],
        "lead_hours": 12, "num_frames": 2,
        "splits": {"train": {"start": "2017-01-01T00:00", "end": "2017-01-01T12:00"}, "test": {"start": "2017-01-02T00:00", "end": "2017-01-02T12:00"}},
    }
    config.update(changes)
    return config


@pytest.fixture(scope="module")
def generated(files, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("generated")
    return era5.generate_dataset(_config(files["cds_new"]), output_dir=out, progress=False)


def test_generated_files_hold_disjoint_windows(generated, raw):
    assert sorted(generated) == ["test", "train"]
    with xr.open_dataset(generated["train"]) as train, xr.open_dataset(generated["test"]) as test:
        assert list(train.data_vars) == ["z500", "z850", "t500", "t850"]
        assert dict(train.sizes) == {"trajectory": 10, "time": 2, "latitude": 61, "longitude": 120}
        assert set(train.init_time.values) == {np.datetime64("2017-01-01T00", "ns")}
        assert set(test.init_time.values) == {np.datetime64("2017-01-02T00", "ns")}
        assert not set(train.valid_time.values.ravel()) & set(test.valid_time.values.ravel())
        np.testing.assert_array_equal(test.member.values, np.arange(10))
        assert test.attrs["split"] == "test" and test.attrs["split_start"] == "2017-01-02T00:00:00"


def test_normalisation_comes_from_train_and_round_trips_through_the_files(generated, ds):
    train_fields = era5.to_fields(era5.select(ds, era5.Era5Selection(variables=["z", "t"], end="2017-01-01T12")))
    want = era5.normalization(train_fields)
    for path in generated.values():
        with xr.open_dataset(path) as f:
            assert era5.read_normalization(f) == want  # exact: JSON and netCDF attrs carry float64
            assert f.attrs["normalization_split"] == "train"
            assert f.z500.attrs["normalization_std"] == want["z500"]["std"]


def test_generated_files_open_as_trajectory_datasets(generated, expected):
    data = TrajectoryDataset.open(generated["test"])
    assert data.variables == ("z500", "z850", "t500", "t850")
    assert data.values.shape == (10, 2, 61 * 120, 4)
    assert data.axes == ("latitude", "longitude") and data.grid_shape == (61, 120)
    np.testing.assert_array_equal(data.times, [0.0, 12.0])
    np.testing.assert_array_equal(data.values[3, 1, :, 3].reshape(61, 120), expected["t"][3, 3, 1])  # member 3, 02T12, t850
    assert data.units == ("m2 s-2", "m2 s-2", "K", "K")


def test_generate_refuses_to_overwrite_before_reading(generated, files, monkeypatch):
    before = {p: p.stat().st_mtime_ns for p in generated.values()}

    def unexpected(*args, **kwargs):
        raise AssertionError("the data was read although the files exist")

    monkeypatch.setattr(era5, "open_era5", unexpected)
    with pytest.raises(FileExistsError, match="refusing to overwrite existing file"):
        era5.generate_dataset(_config(files["cds_new"]), output_dir=generated["train"].parent, progress=False)
    assert before == {p: p.stat().st_mtime_ns for p in generated.values()}


def test_generate_validates_every_split_before_writing_any(files, tmp_path, capsys):
    """A test range outside the data fails before train.nc is written, through the API and the CLI; the fixed
    config then generates without --overwrite."""
    from enfpde.cli import main as cli_main

    bad = _config(files["cds_new"], splits={
        "train": {"start": "2017-01-01T00:00", "end": "2017-01-01T12:00"},
        "test": {"start": "2018-06-01T00:00", "end": "2018-06-02T00:00"},
    })
    with pytest.raises(era5.Era5Error, match="split 'test'"):
        era5.generate_dataset(bad, output_dir=tmp_path / "api", progress=False)
    assert not (tmp_path / "api").exists() or list((tmp_path / "api").iterdir()) == []
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert cli_main(["generate", str(tmp_path / "bad.yaml"), "--output-dir", str(tmp_path / "cli"), "--quiet"]) == 2
    assert "split 'test'" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists() or list((tmp_path / "cli").iterdir()) == []
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(_config(files["cds_new"])))
    assert cli_main(["generate", str(tmp_path / "good.yaml"), "--output-dir", str(tmp_path / "cli"), "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["test.nc", "train.nc"]


def test_generate_overwrite_and_subset(files, tmp_path):
    config = _config(files["wb2_zarr"], members=[2, 5], lat_range=[-30, 30], lon_range=[-30, 30], coarsen=2,
                     splits={"train": {"start": "2017-01-01T00", "end": "2017-01-02T12"}}, start_every_hours=24)
    paths = era5.generate_dataset(config, output_dir=tmp_path, progress=False)
    (tmp_path / "train.nc").write_bytes(b"stale")
    paths = era5.generate_dataset(config, output_dir=tmp_path, overwrite=True, progress=False)
    data = TrajectoryDataset.open(paths["train"])
    assert data.values.shape == (4, 2, 11 * 11, 4)  # starts 01T00 and 02T00 x members 2, 5; 11 x 11 points every 6 degrees
    np.testing.assert_array_equal(data.axis_values[1], np.arange(-30.0, 30.1, 6.0))


@pytest.mark.parametrize(
    "changes, message",
    [({"generator": "shallow_water"}, "generator: expected 'era5'"),
     ({"splits": {"test": {"start": "2017-01-01", "end": "2017-01-02"}}}, "a 'train' split"),
     ({"splits": {"train": {"start": "2017-01-01T00", "end": "2017-01-02T00"}, "test": {"start": "2017-01-02T00", "end": "2017-01-02T12"}}},
      "splits 'train' and 'test' overlap"),
     ({"coarsen": 0}, "coarsen: expected an integer >= 1"),
     ({"lead_hours": -1}, "lead_hours: expected a positive number"),
     ({"colour": "red"}, "colour"),
     ({"num_frames": "many"}, "num_frames")],
)
def test_invalid_configs_raise(files, changes, message):
    with pytest.raises(ValueError, match=message):
        era5.load_config(_config(files["cds_new"], **changes))


def test_required_keys(files):
    config = _config(files["cds_new"])
    del config["lead_hours"]
    with pytest.raises(ValueError, match="lead_hours"):
        era5.load_config(config)


def test_source_resolves_against_the_yaml_then_the_working_directory(tmp_path, monkeypatch):
    yaml_dir = tmp_path / "configs"
    yaml_dir.mkdir()
    (yaml_dir / "local.nc").write_bytes(b"")  # loading a config only checks that the source exists
    (yaml_dir / "set.yaml").write_text("generator: era5\nsource: local.nc\nvariables: [z]\nlead_hours: 12\nnum_frames: 2\n"
                                      "splits: {train: {start: '2017-01-01T00', end: '2017-01-01T12'}}\n")
    monkeypatch.chdir(tmp_path)
    assert era5.load_config(yaml_dir / "set.yaml").source == str(yaml_dir / "local.nc")
    (tmp_path / "cwd.nc").write_bytes(b"")
    assert era5.load_config(yaml_dir / "set.yaml", {"source": "cwd.nc"}).source == str(tmp_path / "cwd.nc")
    with pytest.raises(ValueError, match="source 'nowhere.nc': not found; looked for .*configs/nowhere.nc and .*/nowhere.nc"):
        era5.load_config(yaml_dir / "set.yaml", {"source": "nowhere.nc"})


def test_quick_yaml_source_follows_the_environment_variable(files, monkeypatch):
    monkeypatch.setenv("ENFPDE_ERA5_SAMPLE", str(files["cds_new"]))
    config = era5.load_config(REPO / "datasets" / "era5_quick.yaml")
    assert config.source == str(files["cds_new"])
    assert (config.variables, config.levels, config.lead_hours, config.num_frames) == (["z", "t"], [500, 850], 12.0, 2)
    assert dataset_generator(REPO / "datasets" / "era5_quick.yaml") == "era5"


def test_quick_yaml_on_the_sample(sample, tmp_path, monkeypatch):
    """datasets/era5_quick.yaml through the generic dispatcher (what `enfpde generate` calls), on the GRIB sample."""
    monkeypatch.setenv("ENFPDE_ERA5_SAMPLE", str(sample))
    paths = generate_any(REPO / "datasets" / "era5_quick.yaml", output_dir=tmp_path, progress=False)
    train, test = TrajectoryDataset.open(paths["train"]), TrajectoryDataset.open(paths["test"])
    assert train.values.shape == test.values.shape == (10, 2, 61 * 120, 4)
    with xr.open_dataset(paths["test"]) as f:
        np.testing.assert_array_equal(np.unique(f.init_time.values), [np.datetime64("2017-01-02T00", "ns")])
        assert f.attrs["era5_format"] == "grib" and f.attrs["era5_source"] == str(sample)
    assert np.all(np.isfinite(train.values))
