"""The model core: MeBT, its objective and sampler, baselines, FLOP counts, model files, the official converter."""
