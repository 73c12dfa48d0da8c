"""Experiments over the engine: sweeps and their trials, the table of stored runs, the report, bench results."""
