"""Prefect flows: thin wiring that runs one pipeline stage each.

Stage logic lives in :mod:`fcn_pipeline`; a flow loads and validates the
parameters, calls the library inside named tasks and logs what happened.
"""
