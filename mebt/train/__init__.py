"""Training: the MeBT loop and run config, checkpoints and resume, MLflow tracking, sample videos, rendezvous, the tokenizer trainer."""
