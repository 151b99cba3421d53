"""The 3D VQGAN tokenizer (TATS architecture) and its checkpoints."""
