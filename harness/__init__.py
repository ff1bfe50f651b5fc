"""layerbench: stream a Llama-3 model through a small GPU one layer at a time, and measure it."""

__version__ = "0.1.0"
