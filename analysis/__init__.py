"""Experiment results -> tables, parquet, plots, reports, exported best configs."""
