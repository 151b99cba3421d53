"""The small video dataset and tokenizer the preprocessing tests (and those built on their output) use."""
import torch

from data_pipeline.preprocess import PreprocessConfig
from data_pipeline.synthetic_videos import SynthConfig
from data_pipeline.video import ClipConfig
from mebt.tokenizer.vqgan import VQGAN, VQGANConfig

# 8 train videos once the broken one is added (7 synthetic + 1 unreadable), 2 videos per shard: 4 shards.
# Clips of 4 frames every 4 frames of 8-frame videos: 2 clips per readable video, grids 2 x 4 x 4.
SYNTH = SynthConfig(num_videos=9, frames=8, resolution=32, test_fraction=0.25)
CLIP = ClipConfig(sequence_length=4, resolution=16, all_stride=4)
GRID = [2, 4, 4]
N_CODES = 32


def tiny_tokenizer(seed: int) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(VQGANConfig(embedding_dim=8, n_codes=N_CODES, n_hiddens=4, downsample=(2, 4, 4), num_groups=4))


def make_config(data, out, **overrides) -> PreprocessConfig:
    # batch_size 3 over 4 clips per shard also exercises a partial last batch.
    kwargs = dict(input_dir=str(data.videos), out_dir=str(out), tokenizer=str(data.tokenizer), split="train",
                  clip=CLIP, videos_per_shard=2, batch_size=3, device="cpu")
    return PreprocessConfig(**{**kwargs, **overrides})
