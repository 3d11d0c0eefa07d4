"""Speed and memory of the ERA5 data path (enfpde.data.era5) on a real GRIB file and on archive-sized stores.

This is the code that runs when a user points the package at their ERA5 archive: before any training, the
archive is opened, selected, flattened into 2-D fields, normalised and cut into windows, and for a dataset YAML
all of it again per split followed by writing netCDF files. The benchmark times each of those steps and says
how much memory it needs, so that a slow or memory-hungry step shows up here rather than as a stalled
`enfpde generate` on a year of hourly data.

Sources (each written into a temporary directory, except the GRIB sample):
  grib        the real ERA5 sample beside the project (../shared/data/era5-levels-members.grib: 10 members,
              4 times 12 h apart, z and t at 500 and 850 hPa, 61 x 120), read through cfgrib. Skipped when absent.
  zarr        a synthetic WeatherBench2-style store: the 1.5-degree grid (121 x 240, latitude ascending from the
              south pole, poles included), hourly for --days days, geopotential and temperature at 500 and 850
              hPa plus 2m_temperature under their long names, zarr format 2 with consolidated metadata, chunked
              by --time-chunk times (default 24, one chunk per day).
  zarr-t1     the same store chunked by single times, as the public WeatherBench2 stores are.
  netcdf-dir  the same data as a directory of per-day netCDF-4 files in the current Copernicus CDS layout
              (valid_time, pressure_level, latitude descending from the north pole, short names z/t/t2m, a
              scalar `number` and an `expver` coordinate), zlib level 1, one chunk per time and level.

Stages per source (each repeat in a fresh Python process, so every repeat is a user's first read of the data
and its memory is its own; imports are done before the clock starts):
  open           open_era5(path), the process's first (it includes one-off costs of xarray and the readers)
  open again     open_era5(path) once more in the same process: the cost of opening per se
  select         select(data, Era5Selection(variables, levels)); all times
  to_fields      to_fields(selected).load(): the read itself (to_fields is already eager on zarr and GRIB)
  normalization  normalization(fields)
  windows        windows(fields, ...): 1 h lead, 2 frames, a window every 6 h (the GRIB sample: 12 h, 2 frames)

generate: enfpde.data.era5.generate_dataset for the `zarr` store, lead 1 h, 2 frames, a window every 6 h,
coarsen 1, train on the first two thirds of the days and test on the rest (20 / 10 days by default).

Reported per stage: median wall time over --repeats processes, the fastest one, throughput (2-D frames and
float32 MB per second: frames read for to_fields and normalization, frames written for windows), and peak
resident memory. The peak is the kernel's own high-water mark of the stage: before each stage the mark is reset
(`echo 5 > /proc/self/clear_refs`, Linux) and VmHWM is read after it; it includes the memory held from the
earlier stages (the column "RSS at start"). Where the reset is not allowed the column is the process's peak so
far (ru_maxrss) and the table says so. The stores are read from the page cache (they were just written):
the figures are the CPU cost of the path, not of a cold disk.

Usage:
  nice -n 10 python benchmarks/bench_era5.py                  # print the tables
  nice -n 10 python benchmarks/bench_era5.py --write          # also write benchmarks/results/era5.md
  python benchmarks/bench_era5.py --days 7 --repeats 5 --cases zarr generate
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULT_FILE = Path(__file__).parent / "results" / "era5.md"
GRIB_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "era5-levels-members.grib"
CASES = ("grib", "zarr", "zarr-t1", "netcdf-dir", "generate")
START = "2020-01-01T00:00"
LEVELS = (500, 850)
SHARED_LOAD = 1.5  # a 1-minute load average above this at the start: other jobs were using the machine


# ------------------------------------------------------------------------------------------------ memory


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Stage:
    """Times one stage and reads its peak resident memory: ``with Stage(record, "open"): ...``."""

    def __init__(self, record: list, name: str, frames: int = 0, megabytes: float = 0.0):
        self.record, self.name, self.frames, self.megabytes = record, name, frames, megabytes

    def __enter__(self):
        self.exact = _reset_peak()
        self.rss_start = _status_kb("VmRSS")
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        seconds = time.perf_counter() - self.start
        peak = _status_kb("VmHWM") if self.exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.record.append({
            "stage": self.name, "seconds": seconds, "rss_start_gb": self.rss_start / 1e6, "peak_gb": peak / 1e6,
            "peak_exact": self.exact, "frames": self.frames, "megabytes": self.megabytes,
        })


def _frames(fields) -> tuple[int, float]:
    """Number of 2-D frames and float32 megabytes of a Dataset of ``[..., latitude, longitude]`` fields."""
    frames = sum(da.size // (da.sizes["latitude"] * da.sizes["longitude"]) for da in fields.data_vars.values())
    return int(frames), sum(da.size * 4 for da in fields.data_vars.values()) / 1e6


# ------------------------------------------------------------------------------------------------ synthetic data


def _day(day: int, num_lat: int = 121, num_lon: int = 240):
    """One day of hourly synthetic ERA5 in the WeatherBench2 layout: smooth travelling waves on zonal-mean
    profiles plus a little noise, so the values (and their compressibility) resemble real fields."""
    import numpy as np
    import pandas as pd
    import xarray as xr

    rng = np.random.default_rng(day)
    times = pd.date_range(START, periods=24, freq="h") + pd.Timedelta(days=day)
    lat = np.linspace(-90.0, 90.0, num_lat)
    lon = np.arange(num_lon) * (360.0 / num_lon)
    hours = (day * 24 + np.arange(24, dtype=np.float64))[:, None, None]
    phi, lam = np.deg2rad(lat)[None, :, None], np.deg2rad(lon)[None, None, :]

    def field(mean, equator_to_pole, wave, speed, noise):
        values = mean + equator_to_pole * np.cos(phi) ** 2 + wave * np.cos(phi) * np.sin(5 * lam - speed * hours + 0.3 * day)
        return (values + noise * rng.standard_normal((24, num_lat, num_lon))).astype(np.float32)

    level_dims = ("time", "level", "latitude", "longitude")
    z = np.stack([field(49000.0, 5000.0, 800.0, 0.02, 5.0), field(12500.0, 2000.0, 500.0, 0.015, 5.0)], axis=1)
    t = np.stack([field(235.0, 25.0, 4.0, 0.02, 0.2), field(255.0, 35.0, 5.0, 0.015, 0.2)], axis=1)
    t2m = field(250.0, 50.0, 6.0, 0.01, 0.5)
    return xr.Dataset(
        {
            "geopotential": (level_dims, z, {"units": "m**2 s**-2", "long_name": "Geopotential"}),
            "temperature": (level_dims, t, {"units": "K", "long_name": "Temperature"}),
            "2m_temperature": (("time", "latitude", "longitude"), t2m, {"units": "K", "long_name": "2 metre temperature"}),
        },
        coords={"time": times, "level": np.asarray(LEVELS, np.int64), "latitude": lat, "longitude": lon},
    )


def write_zarr(path: Path, days: int, time_chunk: int) -> None:
    """A WeatherBench2-style store, appended one day at a time (zarr format 2, consolidated metadata)."""
    for day in range(days):
        ds = _day(day)
        if day == 0:
            encoding = {name: {"chunks": (time_chunk,) + ds[name].shape[1:]} for name in ds.data_vars}
            ds.to_zarr(path, mode="w", zarr_format=2, consolidated=True, encoding=encoding)
        else:
            ds.to_zarr(path, append_dim="time", zarr_format=2, consolidated=True)


def write_netcdf_dir(path: Path, days: int) -> None:
    """Per-day netCDF-4 files as the Copernicus CDS serves them since 2024 (short names, valid_time,
    pressure_level, latitude from north to south, a scalar member number and an expver per time)."""
    import numpy as np

    path.mkdir()
    for day in range(days):
        ds = _day(day).rename(
            {"geopotential": "z", "temperature": "t", "2m_temperature": "t2m", "time": "valid_time", "level": "pressure_level"}
        )
        ds = ds.isel(latitude=slice(None, None, -1))
        ds = ds.assign_coords(
            pressure_level=("pressure_level", ds["pressure_level"].values.astype(np.float64), {"units": "hPa"}),
            number=np.int64(0),
            expver=("valid_time", np.full(ds.sizes["valid_time"], "0001")),
        )
        encoding = {name: {"zlib": True, "complevel": 1, "chunksizes": (1,) * (ds[name].ndim - 2) + ds[name].shape[-2:]} for name in ds.data_vars}
        encoding["valid_time"] = {"units": "seconds since 1970-01-01", "dtype": "int64"}
        date = str(ds["valid_time"].values[0])[:10]
        ds.to_netcdf(path / f"era5_{date}.nc", engine="netcdf4", format="NETCDF4", encoding=encoding)


def _disk_mb(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / 1e6
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


# ------------------------------------------------------------------------------------------------ worker


def _import_readers(case: str) -> None:
    """Import what a case uses before the clock starts (the GRIB reader imports cfgrib on first use)."""
    modules = ["netCDF4", "xarray", "zarr", "enfpde.data.era5"]
    modules += {"grib": ["cfgrib"], "netcdf-dir": ["dask.array"]}.get(case, [])
    for module in modules:
        importlib.import_module(module)


def run_pipeline(case: str, path: str) -> list:
    """The stages of one source, in this process; returns one record per stage."""
    from enfpde.data.era5 import Era5Selection, normalization, open_era5, select, to_fields, windows

    _import_readers(case)
    if case == "grib":
        selection = Era5Selection(variables=["z", "t"], levels=list(LEVELS))
        lead, frames, every = 12.0, 2, 12.0
    else:
        selection = Era5Selection(variables=["z", "t", "t2m"], levels=list(LEVELS))
        lead, frames, every = 1.0, 2, 6.0
    record: list = []
    with Stage(record, "open"):
        data = open_era5(path)
    with Stage(record, "open again"):
        open_era5(path)
    with Stage(record, "select"):
        selected = select(data, selection)
    with Stage(record, "to_fields"):
        fields = to_fields(selected).load()
    stage_counts = _frames(fields)
    record[-1].update(frames=stage_counts[0], megabytes=stage_counts[1])
    with Stage(record, "normalization", *stage_counts):
        normalization(fields)
    with Stage(record, "windows"):
        trajectories = windows(fields, lead, frames, every)
    counts = _frames(trajectories)
    record[-1].update(frames=counts[0], megabytes=counts[1], trajectories=int(trajectories.sizes["trajectory"]),
                      window_frames=frames, fields=len(fields.data_vars))
    return record


def run_generate(path: str, days: int, output: str) -> list:
    """generate_dataset for the zarr store, train on the first two thirds of the days, test on the rest."""
    import pandas as pd

    from enfpde.data.era5 import generate_dataset, load_config

    _import_readers("zarr")
    start = pd.Timestamp(START)
    train_days = max(1, round(days * 2 / 3))
    iso = lambda t: t.strftime("%Y-%m-%dT%H:%M")  # noqa: E731
    config = load_config({
        "generator": "era5", "name": "era5_bench", "source": path, "variables": ["z", "t", "t2m"],
        "levels": list(LEVELS), "coarsen": 1, "stride": 1, "lead_hours": 1, "num_frames": 2, "start_every_hours": 6,
        "splits": {
            "train": {"start": iso(start), "end": iso(start + pd.Timedelta(hours=24 * train_days - 1))},
            "test": {"start": iso(start + pd.Timedelta(days=train_days)), "end": iso(start + pd.Timedelta(hours=24 * days - 1))},
        },
        "output_dir": output,
    })
    record: list = []
    with Stage(record, "generate_dataset"):
        files = generate_dataset(config, overwrite=True, progress=False)
    record[-1].update(files={split: round(Path(p).stat().st_size / 1e6, 2) for split, p in files.items()},
                      train_days=train_days, test_days=days - train_days)
    return record


# ------------------------------------------------------------------------------------------------ driver


def machine() -> dict:
    from importlib import metadata

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    versions = {}
    for package in ("numpy", "xarray", "zarr", "netCDF4", "cfgrib", "eccodes", "dask"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "versions": versions}


def _command(argv: list[str]) -> str:
    niceness = os.nice(0)
    prefix = f"nice -n {niceness} " if niceness else ""
    return prefix + "python benchmarks/bench_era5.py" + "".join(" " + shlex.quote(a) for a in argv)


def _worker(args: list[str]) -> list:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _summary(runs: list[list]) -> list[dict]:
    """Per stage: median and fastest time over the repeats, largest peak memory."""
    rows = []
    for i, first in enumerate(runs[0]):
        stage = [run[i] for run in runs]
        seconds = [s["seconds"] for s in stage]
        row = dict(first)
        row.update(
            median_s=statistics.median(seconds), min_s=min(seconds), peak_gb=max(s["peak_gb"] for s in stage),
            rss_start_gb=statistics.median(s["rss_start_gb"] for s in stage), peak_exact=all(s["peak_exact"] for s in stage),
        )
        rows.append(row)
    return rows


def _throughput(row: dict) -> str:
    if not row.get("frames") or row["median_s"] <= 0:
        return "-"
    return f"{row['frames'] / row['median_s']:,.0f} frames/s, {row['megabytes'] / row['median_s']:,.0f} MB/s"


def markdown(info: dict, sources: dict, results: dict, generated: dict | None, args, command: str, load: tuple, load_end: float) -> str:
    v = info["versions"]
    lines = [
        "# ERA5 data-path benchmark (enfpde.data.era5)",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores; Python {info['python']}, numpy {v['numpy']}, xarray {v['xarray']}, "
        f"zarr {v['zarr']}, netCDF4 {v['netCDF4']}, cfgrib {v['cfgrib']} (eccodes {v['eccodes']}), dask {v['dask']}.",
        f"Command: `{command}` (median of {args.repeats} runs, each in a fresh process).",
        "",
        f"Load average at the start: {load[0]:.2f} (1 min), {load[1]:.2f} (5 min)"
        + (f"; above {SHARED_LOAD}: the machine was shared with other jobs, so the wall times are pessimistic" if load[0] > SHARED_LOAD else "")
        + f". At the end: {load_end:.2f} (1 min).",
        "",
        "## Sources",
        "",
        "| source | data | on disk | written in |",
        "|---|---|---|---|",
    ]
    for name, s in sources.items():
        written = f"{s['write_s']:.1f} s" if s.get("write_s") is not None else "-"
        lines.append(f"| {name} | {s['description']} | {s['disk_mb']:.1f} MB | {written} |")
    exact = all(row["peak_exact"] for rows in results.values() for row in rows)
    lines += [
        "",
        "## Stages",
        "",
        "Throughput: 2-D float32 frames read (to_fields, normalization) or written (windows) per second at the median time. "
        + ("Peak RSS: the stage's own high-water mark (VmHWM reset before the stage), which includes the memory the "
           "process held at the stage's start; the largest over the runs."
           if exact else "Peak RSS: the process's peak so far (ru_maxrss; the high-water mark could not be reset)."),
        "",
        "| source | stage | median | fastest | throughput | RSS at start | peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        for row in rows:
            lines.append(
                f"| {name} | {row['stage']} | {row['median_s']:.3f} s | {row['min_s']:.3f} s | {_throughput(row)} | "
                f"{row['rss_start_gb']:.2f} GB | {row['peak_gb']:.2f} GB |"
            )
        total = sum(row["median_s"] for row in rows if row["stage"] != "open again")
        lines.append(f"| {name} | **total** (open again not counted) | **{total:.2f} s** | | | | {max(r['peak_gb'] for r in rows):.2f} GB |")
    lines.append("")
    for name, rows in results.items():
        read, cut = next(r for r in rows if r["stage"] == "to_fields"), rows[-1]
        lines.append(f"- {name}: {cut['fields']} fields, {read['frames']} frames ({read['megabytes']:.0f} MB) read; "
                     f"{cut['trajectories']} windows of {cut['window_frames']} frames ({cut['megabytes']:.0f} MB).")
    if generated is not None:
        files = ", ".join(f"{split}.nc {mb:.1f} MB" for split, mb in generated["files"].items())
        lines += [
            "",
            "## generate_dataset",
            "",
            f"`generate_dataset` on the `zarr` store: z, t at 500 and 850 hPa and t2m, lead 1 h, 2 frames, a window every 6 h, "
            f"coarsen 1; train on the first {generated['train_days']} days, test on the last {generated['test_days']}.",
            "",
            "| case | median | fastest | peak RSS | files |",
            "|---|---|---|---|---|",
            f"| generate_dataset | {generated['median_s']:.2f} s | {generated['min_s']:.2f} s | {generated['peak_gb']:.2f} GB | {files} |",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--repeats", type=int, default=3, help="runs per case, each in a fresh process (default 3)")
    parser.add_argument("--days", type=int, default=30, help="days of hourly data in the synthetic stores (default 30)")
    parser.add_argument("--time-chunk", type=int, default=24, help="times per zarr chunk of the `zarr` store (default 24)")
    parser.add_argument("--grib", type=Path, default=Path(os.environ.get("ENFPDE_ERA5_SAMPLE", GRIB_SAMPLE)), help="the GRIB sample")
    parser.add_argument("--write", action="store_true", help="write the tables to benchmarks/results/era5.md")
    parser.add_argument("--overwrite", action="store_true", help="with --write: replace an existing result file")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:  # a stage run in its own process: print its records as JSON
        case, path, *rest = args.worker
        record = run_generate(path, args.days, rest[0]) if case == "generate" else run_pipeline(case, path)
        print(json.dumps(record))
        return
    if args.write and RESULT_FILE.exists() and not args.overwrite:
        parser.error(f"{RESULT_FILE} exists; pass --overwrite to replace it.")
    if args.repeats < 1 or args.days < 2 or args.time_chunk < 1:
        parser.error("--repeats must be >= 1, --days >= 2 and --time-chunk >= 1.")
    load = os.getloadavg()
    command = _command(argv)
    print(f"load average {load[0]:.2f}; {command}", flush=True)

    sources: dict = {}
    results: dict = {}
    generated = None
    with tempfile.TemporaryDirectory(prefix="bench_era5_") as tmp:
        tmp = Path(tmp)
        grid = f"{args.days} days hourly ({24 * args.days} times), 121 x 240, z/t at 500/850 + t2m"
        if "grib" in args.cases:
            if args.grib.is_file():
                sources["grib"] = {"path": args.grib, "description": "real ERA5 sample: 10 members, 4 times (12 h), z/t at 500/850, 61 x 120"}
            else:
                print(f"skipping grib: no sample at {args.grib}", flush=True)
        writers = {
            "zarr": (lambda p: write_zarr(p, args.days, args.time_chunk), "era5_wb2.zarr", f"WB2-style zarr v2, {grid}, chunks of {args.time_chunk} times"),
            "zarr-t1": (lambda p: write_zarr(p, args.days, 1), "era5_wb2_t1.zarr", f"WB2-style zarr v2, {grid}, chunks of 1 time"),
            "netcdf-dir": (lambda p: write_netcdf_dir(p, args.days), "cds_netcdf", f"{args.days} CDS-layout netCDF-4 files (one a day), zlib 1, {grid}"),
        }
        needed = set(args.cases) | ({"zarr"} if "generate" in args.cases else set())
        for name, (write, directory, description) in writers.items():
            if name in needed:
                print(f"writing {name} ...", flush=True)
                start = time.perf_counter()
                write(tmp / directory)
                sources[name] = {"path": tmp / directory, "description": description,
                                 "write_s": time.perf_counter() - start}
        for s in sources.values():
            s["disk_mb"] = _disk_mb(s["path"])

        for name in (c for c in args.cases if c in sources):
            runs = []
            for i in range(args.repeats):
                runs.append(_worker(["--worker", name, str(sources[name]["path"])]))
                print(f"{name} run {i + 1}: " + ", ".join(f"{r['stage']} {r['seconds']:.2f} s {r['peak_gb']:.2f} GB" for r in runs[-1]), flush=True)
            results[name] = _summary(runs)
        if "generate" in args.cases:
            runs = []
            for i in range(args.repeats):
                runs.append(_worker(["--days", str(args.days), "--worker", "generate", str(sources["zarr"]["path"]), str(tmp / "generated")]))
                print(f"generate run {i + 1}: {runs[-1][0]['seconds']:.2f} s, {runs[-1][0]['peak_gb']:.2f} GB, files {runs[-1][0]['files']} MB", flush=True)
            generated = _summary(runs)[0]
        shutil.rmtree(tmp / "generated", ignore_errors=True)

    text = markdown(machine(), sources, results, generated, args, command, load, os.getloadavg()[0])
    print("\n" + text)
    if args.write:
        RESULT_FILE.parent.mkdir(exist_ok=True)
        with open(RESULT_FILE, "w" if args.overwrite else "x") as f:
            f.write(text)
        print(f"wrote {RESULT_FILE}")


if __name__ == "__main__":
    main()
