"""One job: build the streamer, generate, measure, compare, log."""
