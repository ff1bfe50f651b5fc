"""Peers: other ways to run the same checkpoint, measured with layerbench's ruler (`runner=<name>`)."""
