"""The model under pruning: family adapters, the registered attention function, masks, loading, fingerprints."""
