"""Baselines for the evaluation harness: the Fourier neural operator (:mod:`enfpde.baselines.fno`) and DINo
(:mod:`enfpde.baselines.dino`).

Both train on a :class:`~enfpde.data.trajectories.TrajectoryDataset` with ``fno.train`` / ``dino.train`` and
return a forecaster with ``predict(coords, initial_values, times, query_coords)`` in raw units (the
:class:`~enfpde.evaluation.ArrayForecaster` protocol), ``forecast(ds, times, at, variables)`` on xarray
Datasets (:class:`~enfpde.forecaster.XarrayForecast`, the interface of the ENF forecaster), ``save(path)`` /
``load(path)`` and ``num_parameters``.
"""

from enfpde.baselines import dino, fno
from enfpde.baselines.common import Grid, SphereDomain, TorusDomain, domain_for_dataset
from enfpde.baselines.dino import DINoConfig, DINoForecaster, DINoTrainConfig
from enfpde.baselines.fno import FNOConfig, FNOForecaster, FNOTrainConfig

__all__ = [
    "DINoConfig",
    "DINoForecaster",
    "DINoTrainConfig",
    "FNOConfig",
    "FNOForecaster",
    "FNOTrainConfig",
    "Grid",
    "SphereDomain",
    "TorusDomain",
    "dino",
    "domain_for_dataset",
    "fno",
]
