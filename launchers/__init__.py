"""SLURM (submitit) and local launchers."""
