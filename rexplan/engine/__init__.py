"""Runs plans: waves, callbacks, fan-out, lifecycle, events and run records."""
