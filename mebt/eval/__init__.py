"""Evaluation: sampling a checkpoint, I3D, FVD/KVD and their protocols, `mebt fvd`, run comparison."""
