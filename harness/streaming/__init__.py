"""The layer-streaming model and the strategy pipeline that feeds it."""
