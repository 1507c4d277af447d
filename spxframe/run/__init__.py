"""lightcurves(): sky cells, local and Dask executors, outputs, provenance and resume."""
