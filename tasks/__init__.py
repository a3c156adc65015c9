"""Thin Prefect tasks over the plain-Python core in `wdsembed`."""
