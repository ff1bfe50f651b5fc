"""layerbench: stream a Llama-3 model through a small GPU one layer at a time, and measure it."""

from harness.allocator import reuse_freed_memory

__version__ = "0.1.0"

# Before any big allocation: every process that runs or probes a model reuses freed host memory (allocator.py).
reuse_freed_memory()
