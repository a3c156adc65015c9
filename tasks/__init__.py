# Each task is task(...)(plain_function): the plain function keeps its own module-level name, so Dask pickles
# it by reference (a function shadowed by its Task object can only be pickled by value, which fails).
"""Thin Prefect tasks over the plain-Python core in `wdsembed`."""
