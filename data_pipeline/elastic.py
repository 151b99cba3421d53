"""Resuming a loader on another layout: other process counts, workers, micro-batch sizes or accumulation,
with the same samples per optimizer step.

A run's batches are fixed by the plan of its first start (the *source* plan, ``loader_state.EpochPlan``):
optimizer step t of an epoch takes, from every source rank v, its batches [t*A0, (t+1)*A0) of B0 samples
each. Laid end to end, v-major, they are the step's G = V*A0*B0 global slots. A loader of W processes
with micro-batch B and accumulation A (W*A*B = G) deals those slots out anew: process r takes slots
[r*G/W, (r+1)*G/W), as A micro-batches of B. So the global batch of every step, and every sample's own
random draws (seeded by its slot's ``sample_id``, not by the process), are those of an uninterrupted run,
whatever W was before or after: over the run every sample of every epoch is taken exactly once, and the
losses match an uninterrupted run up to float summation order. It is the idea of MosaicML Streaming's
``num_canonical_nodes``, with the first start's ranks as the canonical ones.

The price is reading: a process reads every shard of the source ranks whose slots it takes, so with
W < V it reads V/W source ranks' shards (what it needs anyway), and with W > V a source rank's shards are
read by W/V processes. Inside a process, DataLoader worker w builds the steps (t - t0) % S == w and reads
the same source streams as its siblings (local shards are memory-mapped, so the page cache is shared;
shards at URLs are fetched by each worker). A run that resumes on its original layout uses none of this.
"""
from __future__ import annotations

import dataclasses

import torch
from torch.utils.data import IterableDataset, get_worker_info

from data_pipeline.loader_state import DatasetIndex, EpochPlan, consumed_batches
from data_pipeline.stream_reader import CorruptShardError, StreamReader
from mebt.errors import ConfigError


def slice_batch(batch: dict, a: int, b: int) -> dict:
    return {k: v[a:b] if isinstance(v, (torch.Tensor, list)) else v for k, v in batch.items()}


def concat_batches(parts: list[dict]) -> dict:
    out = {}
    for key, first in parts[0].items():
        if isinstance(first, torch.Tensor):
            out[key] = torch.cat([p[key] for p in parts])
        elif isinstance(first, list):
            out[key] = [x for p in parts for x in p[key]]
        else:
            out[key] = first
    return out


class ElasticSteps(IterableDataset):
    """The rest of one epoch for process ``rank`` of ``world_size`` (micro-batch ``batch_size``, ``accum``
    per step) following the slots of ``source``: one item per optimizer step, its micro-batches in order."""

    def __init__(self, index: DatasetIndex, cfg, source: EpochPlan, grid: tuple, rank: int, world_size: int,
                 batch_size: int, accum: int, epoch: int, position: int, layouts: dict):
        self.index, self.source, self.grid, self.layouts = index, source, grid, layouts
        # The source streams are read with the source's batch size.
        self.cfg = dataclasses.replace(cfg, batch_size=source.batch_size)
        self.rank, self.world_size, self.batch_size, self.accum = rank, world_size, batch_size, accum
        self.epoch, self.position = epoch, position

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        src = self.source
        per_source = src.accum * src.batch_size              # slots of one source rank in a step
        per_rank = src.global_batch // self.world_size
        lo, hi = self.rank * per_rank, (self.rank + 1) * per_rank
        sources = range(lo // per_source, (hi - 1) // per_source + 1)
        first_step, steps = self.position // src.accum, src.batches_per_rank // src.accum
        readers = {}
        try:
            for v in sources:
                for s in range(src.num_streams):
                    plan = src.stream(self.index.layout, v, s, self.epoch)
                    readers[v, s] = StreamReader(self.index, self.cfg, plan, self.grid,
                                                 consumed_batches(self.position, s, src.num_streams), self.layouts)
            for t in range(first_step, steps):
                mine = (t - first_step) % workers == worker
                parts, found = [], []
                for v in sources:
                    for m in range(src.accum):
                        j = t * src.accum + m
                        reader, local = readers[v, j % src.num_streams], j // src.num_streams
                        start = (v * src.accum + m) * src.batch_size   # the batch's first slot in the step
                        a, b = max(lo, start) - start, min(hi, start + src.batch_size) - start
                        if not mine or b <= a:
                            reader.skip(local)
                            continue
                        batch = reader.batch(local)
                        found += batch.pop("corrupt_shards")
                        batch["sample_id"] = torch.from_numpy(src.sample_ids(v, j))
                        parts.append(slice_batch(batch, a, b))
                if mine:
                    whole = concat_batches(parts)
                    micro = [{**slice_batch(whole, i * self.batch_size, (i + 1) * self.batch_size),
                              "epoch": self.epoch, "batch_index": t * src.accum} for i in range(self.accum)]
                    yield {"micro": micro, "epoch": self.epoch, "step": t, "corrupt_shards": found}
        except CorruptShardError as e:
            yield {"error": str(e)}   # raised by the main process as one clean line
        finally:
            for reader in readers.values():
                reader.close()


def adapt_layout(global_batch: int, world_size: int, batch_size: int) -> tuple[int, int] | None:
    """(micro-batch, accumulation) for ``world_size`` processes that keep ``global_batch`` samples per step:
    the largest micro-batch up to ``batch_size`` (the memory a process was given) that divides the share of
    each process; None when the processes cannot share the global batch evenly."""
    if global_batch % world_size:
        return None
    share = global_batch // world_size
    micro = max(d for d in range(1, min(batch_size, share) + 1) if share % d == 0)
    return micro, share // micro


def check_layout(source: EpochPlan, world_size: int, batch_size: int, accum: int) -> None:
    if world_size * batch_size * accum != source.global_batch:
        raise ConfigError(f"cannot resume the data loader: it was saved taking {source.global_batch} clips per step "
                          f"({source.world_size} process(es) x {source.accum} micro-batch(es) x {source.batch_size}) "
                          f"and now takes {world_size * batch_size * accum} ({world_size} x {accum} x {batch_size}); "
                          "keep the clips per step (data.batch_size x deepspeed.grad_accum x processes)")

