"""Benchmarks of the serving stack (run with the project's virtual environment)."""
