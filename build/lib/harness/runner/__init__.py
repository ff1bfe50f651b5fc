"""The layer-streaming runner and the strategy pipeline that feeds it."""
