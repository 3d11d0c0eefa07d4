"""Datasets: the trajectory schema and data layer, and one module per data source."""
