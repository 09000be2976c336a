"""Scripts that print figures (parity, speed, memory); run them as `python -m benchmarks.<name>`."""
