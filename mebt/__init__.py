"""mebt: distributed training of MeBT (Memory-efficient Bidirectional Transformer) for long videos."""
__version__ = "0.1.0"
