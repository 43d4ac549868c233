"""Temper's command line (`python -m app`, `temper`): `main` parses and dispatches; the verbs are
grouped by subject in `jobs`, `serve` and `registry`."""
