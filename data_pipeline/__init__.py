"""Video reading, synthetic data, sharded preprocessing, shard verification and streaming loading."""
