"""Performance measurements, runnable by anyone: `python -m benchmarks.NAME`."""
