"""layerbench's own runner: the model streamed one decoder layer at a time, as the strategy groups choose."""
