"""Log schema, validation, synthetic world, MovieLens-1M, batching."""
