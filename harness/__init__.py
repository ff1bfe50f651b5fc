"""layerbench: stream a Llama-3 model through a small GPU one layer at a time, and measure it."""

__version__ = "0.1.0"

from harness.allocator import one_arena

# Before any import that starts a thread (MLflow's pyarrow does): see harness/allocator.py.
one_arena()
