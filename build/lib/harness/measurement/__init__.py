"""Measuring a run: token timing, the per-stage timeline, memory and VRAM, the environment, the run report."""
