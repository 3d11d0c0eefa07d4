"""Datasets: the trajectory schema and data layer, and one module per data source."""

from __future__ import annotations

import os
from pathlib import Path

GENERATORS = ("navier_stokes", "shallow_water", "era5")


def dataset_generator(config_path: str | os.PathLike) -> str:
    """The generator a dataset YAML names in its ``generator`` key (``navier_stokes`` when absent)."""
    from omegaconf import OmegaConf

    path = Path(config_path)
    if not path.exists():
        raise FileNotFoundError(f"no dataset config at '{path}'.")
    raw = OmegaConf.to_container(OmegaConf.load(path))
    name = raw.get("generator", "navier_stokes") if isinstance(raw, dict) else None
    if name not in GENERATORS:
        raise ValueError(f"{path}: unknown generator {name!r}; expected one of {list(GENERATORS)}.")
    return name


def generate_dataset(
    config_path: str | os.PathLike, output_dir=None, overwrite: bool = False, progress: bool = True
) -> dict[str, Path]:
    """Generate every split of the dataset YAML ``config_path`` with the generator it names.

    Returns split name -> file path; see :func:`enfpde.data.navier_stokes.generate_dataset`,
    :func:`enfpde.data.shallow_water.generate_dataset` and :func:`enfpde.data.era5.generate_dataset` for the files
    and their guarantees.
    """
    generator = dataset_generator(config_path)
    if generator == "shallow_water":
        from enfpde.data.shallow_water import generate_dataset as generate
    elif generator == "era5":
        from enfpde.data.era5 import generate_dataset as generate
    else:
        from enfpde.data.navier_stokes import generate_dataset as generate
    return generate(config_path, output_dir=output_dir, overwrite=overwrite, progress=progress)
