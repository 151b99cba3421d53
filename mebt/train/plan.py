"""`mebt plan`: what a training config costs on a cluster, before a job starts.

Per GPU: memory (parameters, gradients, optimizer partitions, communication buckets, activations with and
without activation checkpointing, the loss chunk), FLOPs and an estimated time per step, the communication
volume and time of the ZeRO stage, the clip-length curriculum at the first and last step, and warnings
(does not fit, communication-bound, the curriculum never reaches full clips, checkpointing unnecessary).

Every number is a model, stated with its rule:
- Model states follow DeepSpeed's own estimators (``estimate_zero2/3_model_states_mem_needs``): in bf16,
  2 bytes of weights per parameter (ZeRO-3: partitioned, plus the largest layer gathered) and 18 bytes of
  gradients, fp32 master weights and Adam moments divided over the GPUs from ZeRO-2 on.
- Activations are the bytes autograd saves, per block, as measured on this model (tests/unit/test_plan.py
  compares them with the saved tensors of real forward passes): per query row a*d + 4*heads + 16 bytes,
  per key/value row b*d + 8, with (a, b) = (56, 16) in fp32 and (32, 12) under bf16 autocast (which also
  keeps a bf16 copy of every weight). The worst mask ratio of the schedule (all targets) at full clip
  length is what must fit.
- Time: matmul FLOPs (``mebt.core.flops``) at ``mfu`` of the card's dense peak; communication: the bytes a
  ring moves per GPU ((n-1)/n of the data), over NVLink inside a node or the interconnect across nodes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mebt.core.flops import mebt_train_flops, peak_for_name
from mebt.core.model import MeBT, MeBTConfig
from mebt.core.objective import MASK_SCHEDULES, clip_length_probs
from mebt.errors import ConfigError
from mebt.train.config import RunConfig, deepspeed_config

GIB = 2 ** 30


@dataclass(frozen=True)
class Gpu:
    name: str            # as torch.cuda.get_device_name says it (for the peak FLOP/s table)
    memory_gib: float
    nvlink_gb_s: float   # per GPU, one direction, inside a node


GPUS = {"h100-80gb": Gpu("H100", 80, 450), "h200-141gb": Gpu("H200", 141, 450), "a100-80gb": Gpu("A100", 80, 300),
        "a100-40gb": Gpu("A100", 40, 300), "v100-32gb": Gpu("V100", 32, 150)}
# Per GPU across nodes (one NIC per GPU, as on DGX/HGX nodes), in bytes per second.
INTERCONNECTS = {"100gbps": 12.5e9, "200gbps": 25e9, "400gbps": 50e9, "800gbps": 100e9}
# Bytes a block saves per row, as (bytes per channel, per head, constant) for query rows, key/value rows and
# self-attention rows, and per (query, key, head) triple; keyed by (16-bit autocast, dropout). Fitted to the
# saved tensors of real blocks (tests/unit/test_plan.py checks whole models against them): with dropout,
# attention runs the math path and keeps its probabilities (fp32) and their dropout mask.
PER_ROW = {(False, False): ((56, 4, 16), (16, 0, 8), (64, 4, 16), 0),
           (True, False): ((32, 4, 16), (12, 0, 8), (40, 4, 16), 0),
           (False, True): ((64, 0, 16), (16, 0, 8), (72, 0, 16), 12),
           (True, True): ((38, 0, 16), (16, 0, 8), (46, 0, 16), 12)}
FIT = 0.92            # of the card's memory: the rest goes to the CUDA context, NCCL and fragmentation


@dataclass
class PlanJob(RunConfig):
    """`mebt plan`: a training config plus the cluster it is meant for."""
    gpus: int = 8                    # GPUs in the job
    gpu: str = "h100-80gb"           # h100-80gb | h200-141gb | a100-80gb | a100-40gb | v100-32gb
    interconnect: str = "400gbps"    # per GPU between nodes: 100gbps | 200gbps | 400gbps | 800gbps
    gpus_per_node: int = 8
    mfu: float = 0.4                 # fraction of the dense peak the time estimate assumes
    json: str | None = None          # also write the plan as JSON here

    def __post_init__(self):
        super().__post_init__()
        for key, table in (("gpu", GPUS), ("interconnect", INTERCONNECTS)):
            if getattr(self, key) not in table:
                raise ConfigError(f"config key '{key}' must be one of {', '.join(table)}, got {getattr(self, key)!r}")
        if self.gpus < 1 or self.gpus_per_node < 1:
            raise ConfigError(f"config keys 'gpus' and 'gpus_per_node' must be >= 1, got {self.gpus}, "
                              f"{self.gpus_per_node}")
        if not 0 < self.mfu <= 1:
            raise ConfigError(f"config key 'mfu' must be in (0, 1], got {self.mfu}")


def block_rows(model: MeBTConfig, n_ctx: int, n_tgt: int) -> list[tuple[str, int, int]]:
    """(kind, query rows, key/value rows) of every block of one sample, as ``MeBT.features`` runs them."""
    n_lat = model.n_latent
    rows = {"latent_enc": (n_lat, n_ctx), "latent_self": (n_lat, 0), "latent_dec": (n_tgt, n_lat),
            "lt2l": (n_lat, n_lat + n_tgt)}
    return [(kind, *rows[kind]) for kind in model.plan]


def block_bytes(kind: str, n_q: int, n_kv: int, model: MeBTConfig, precision: str) -> int:
    """Bytes one block saves for backward, its inputs included (see the module docstring)."""
    d, h = model.n_embd, model.n_head
    q_row, kv_row, self_row, pair = PER_ROW[precision in ("bf16", "fp16"), model.dropout > 0]
    def row(coef: tuple[int, int, int]) -> int:
        return coef[0] * d + coef[1] * h + coef[2]

    if kind == "latent_self":
        return n_q * row(self_row) + pair * h * n_q * n_q
    return n_q * row(q_row) + n_kv * row(kv_row) + pair * h * n_q * n_kv


def activation_bytes(model: MeBTConfig, n_ctx: int, n_tgt: int, precision: str, checkpointing: bool) -> int:
    """Bytes autograd keeps for backward for one sample after the forward pass. With checkpointing these
    are the blocks' inputs; backward then recomputes one block at a time (``recompute_bytes``)."""
    residual = 4 * model.n_embd   # the fp32 residual stream: one row of a block's input
    rows = block_rows(model, n_ctx, n_tgt)
    n_enc = sum(kind == "latent_enc" for kind, _, _ in rows)
    if checkpointing:   # the contexts once: every latent_enc reads the same tensor
        total = residual * (sum(n_q + (n_kv if kind == "lt2l" else 0) for kind, n_q, n_kv in rows) + n_ctx)
    else:
        total = sum(block_bytes(kind, n_q, n_kv, model, precision) for kind, n_q, n_kv in rows)
        total -= (n_enc - 1) * n_ctx * residual if n_enc else 0   # the contexts' embeddings: one tensor
        if precision in ("bf16", "fp16"):   # autocast's 16-bit copy of every block weight, kept for backward
            total += 2 * 12 * model.n_embd ** 2 * len(rows)
    if model.dropout > 0:   # the embedding dropout's masks and outputs (contexts, targets, latents)
        total += 4 * model.n_embd * (n_ctx + n_tgt + (2 if checkpointing else 1) * model.n_latent)
    # The final LayerNorm's input and output (read by the chunked loss) and the position indices.
    return total + n_tgt * (2 * residual + 8) + 16 * (n_ctx + n_tgt)


def recompute_bytes(model: MeBTConfig, n_ctx: int, n_tgt: int, precision: str) -> int:
    """With activation checkpointing: the activations of the largest block, recomputed during backward."""
    casts = 2 * 12 * model.n_embd ** 2 if precision in ("bf16", "fp16") else 0
    return max(block_bytes(kind, n_q, n_kv, model, precision) for kind, n_q, n_kv in block_rows(model, n_ctx, n_tgt)) \
        + casts


def model_state_bytes(params: int, largest: int, stage: int, precision: str, gpus: int, offload: bool) -> int:
    """Weights, gradients and AdamW states per GPU (DeepSpeed's estimators for bf16/fp16 at stages 2 and 3)."""
    if precision == "fp32":   # fp32 weights and gradients, two fp32 moments, no master copy
        weights, grads, states = 4, 4, 8
    else:                     # 16-bit weights and gradients; fp32 master weights, gradients and moments
        weights, grads, states = 2, 2, 16
    opt = 0 if offload else states
    if stage == 0:
        return params * (weights + grads + opt)
    if stage == 1:
        return params * (weights + grads) + params * opt // gpus
    if stage == 2:
        return params * weights + params * (grads + opt) // gpus
    # ZeRO-3 (DeepSpeed's estimator): the largest layer gathered (and its gradient); 16-bit gradients are reduced
    # bucket by bucket rather than kept.
    return 2 * weights * largest + params * (weights + opt) // gpus


def loss_chunk_bytes(model: MeBTConfig, rows: int, n_tgt: int) -> int:
    """The loss chunk's logits at the peak of its backward: fp32 logits, their softmax and gradient."""
    return 3 * 4 * min(rows, n_tgt) * model.vocab_size


def mean_train_flops(cfg: RunConfig, step: int, points: int = 64) -> float:
    """Expected matmul FLOPs of one sample at ``step``: over the clip lengths of the curriculum and the mask
    ratios of the schedule (t uniform in t_range)."""
    obj, model = cfg.objective, cfg.model
    frames, frame = model.latent_shape[0], model.latent_shape[1] * model.latent_shape[2]
    probs = clip_length_probs(obj.t_prior, frames, step).tolist()
    lo, hi = obj.t_range
    total = 0.0
    for length, p in enumerate(probs, start=1):
        if p < 1e-12:
            continue
        n = length * frame
        for i in range(points):
            t = lo + (hi - lo) * (i + 0.5) / points
            n_masked = min(max(math.ceil(MASK_SCHEDULES[obj.mask_schedule](t) * n), 1), n)
            n_tgt = n_masked if obj.target_budget is None else min(obj.target_budget, n_masked)
            total += p * mebt_train_flops(model, n - n_masked, n_tgt) / points
    return total


def worst_split(cfg: RunConfig) -> tuple[int, int]:
    """(contexts, targets) of the full-length clip with the most saved activations: the largest target count."""
    n = cfg.model.block_size
    n_tgt = n if cfg.objective.target_budget is None else min(cfg.objective.target_budget, n)
    lo, hi = cfg.objective.t_range
    n_masked = max(min(math.ceil(MASK_SCHEDULES[cfg.objective.mask_schedule](t) * n), n) for t in (lo, hi))
    return n - n_masked, min(n_tgt, n_masked)


def comm_bytes(params: int, stage: int, precision: str, gpus: int, accum: int) -> float:
    """Bytes each GPU sends per optimizer step (a ring moves (n-1)/n of the data per GPU)."""
    if gpus == 1:
        return 0.0
    width = 4 if precision == "fp32" else 2
    ring = (gpus - 1) / gpus * params * width
    if stage <= 1:       # all-reduce (reduce-scatter + all-gather) of the gradients once per step
        return 2 * ring
    if stage == 2:       # reduce-scatter of the gradients every micro-batch, all-gather of the weights once
        return ring * (accum + 1)
    return 3 * ring * accum   # ZeRO-3: weights gathered for forward and backward, gradients reduce-scattered


def memory_per_gpu(cfg: RunConfig, gpus: int) -> dict:
    """Bytes per GPU: model states, buckets, loss chunk, activations (with and without checkpointing) and the
    totals, for ``cfg`` on ``gpus`` GPUs."""
    ds = cfg.deepspeed
    with torch.device("meta"):   # sizes only: no memory, no initialisation
        model = MeBT(cfg.model)
    params = model.num_params()
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    generated = deepspeed_config(cfg, gpus, "cuda")
    zero = generated["zero_optimization"]
    width = 4 if ds.precision == "fp32" else 2
    buckets = (2 if zero.get("overlap_comm") else 1) * zero.get("reduce_bucket_size", 0) * width \
        + zero.get("allgather_bucket_size", 0) * width
    n_ctx, n_tgt = worst_split(cfg)
    micro = cfg.data.batch_size
    memory = {"model_states": model_state_bytes(params, largest, ds.zero_stage, ds.precision, gpus,
                                                ds.offload_optimizer),
              "buckets": buckets, "loss_chunk": loss_chunk_bytes(cfg.model, cfg.objective.loss_chunk_rows, n_tgt),
              "activations": micro * activation_bytes(cfg.model, n_ctx, n_tgt, ds.precision, False),
              "activations_checkpointed": micro * (activation_bytes(cfg.model, n_ctx, n_tgt, ds.precision, True)
                                                   + recompute_bytes(cfg.model, n_ctx, n_tgt, ds.precision))}
    fixed = memory["model_states"] + buckets + memory["loss_chunk"]
    return {**memory, "total": fixed + memory["activations"],
            "total_checkpointed": fixed + memory["activations_checkpointed"], "worst_split": [n_ctx, n_tgt],
            "params": params, "grad_accum": generated["gradient_accumulation_steps"]}   # deepspeed.extra may set it


def resolve_checkpointing(cfg: RunConfig, gpus: int, capacity: int | None,
                          memory: dict | None = None) -> tuple[bool, str]:
    """``model.grad_checkpoint`` as a bool, and why: ``auto`` turns it on only when the estimated memory without
    it exceeds ``FIT`` of ``capacity`` bytes (the GPU's; None on a CPU, where it stays off). ``memory``:
    ``memory_per_gpu(cfg, gpus)`` when the caller has it."""
    setting = cfg.model.grad_checkpoint
    if setting != "auto":
        return bool(setting), "set in the config"
    if capacity is None:
        return False, "auto: off on a CPU"
    need = (memory or memory_per_gpu(cfg, gpus))["total"]
    on = need > FIT * capacity
    return on, (f"auto: {'on' if on else 'off'}, ~{need / GIB:.1f} GiB per GPU without it, "
                f"{FIT * capacity / GIB:.1f} GiB usable")


def plan(job: PlanJob) -> dict:
    """The plan as a dict (what ``format_plan`` prints)."""
    cfg, gpu = job, GPUS[job.gpu]
    ds = cfg.deepspeed
    memory = memory_per_gpu(cfg, job.gpus)
    capacity = gpu.memory_gib * GIB
    checkpointing, why = resolve_checkpointing(cfg, job.gpus, capacity, memory)
    params, accum, (n_ctx, n_tgt) = memory.pop("params"), memory.pop("grad_accum"), memory.pop("worst_split")
    micro = cfg.data.batch_size
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[ds.precision]
    peak = peak_for_name(gpu.name, dtype)
    if peak is None:
        raise ConfigError(f"a {job.gpu} has no {ds.precision} units: set deepspeed.precision to fp16 or fp32")
    samples_per_gpu = micro * accum
    steps = {}
    for name, step in (("first", 0), ("last", cfg.train.steps)):
        flops = mean_train_flops(cfg, step) * samples_per_gpu * (4 / 3 if checkpointing else 1)
        probs = clip_length_probs(cfg.objective.t_prior, cfg.model.latent_shape[0], step)
        steps[name] = {"step": step, "flops_per_gpu": flops, "compute_s": flops / (peak * job.mfu),
                       "mean_clip_frames": float((probs * torch.arange(1, len(probs) + 1)).sum()),
                       "p_full_length": float(probs[-1])}
    volume = comm_bytes(params, ds.zero_stage, ds.precision, job.gpus, accum)
    bandwidth = gpu.nvlink_gb_s * 1e9 if job.gpus <= job.gpus_per_node else INTERCONNECTS[job.interconnect]
    comm_s = volume / bandwidth
    out = {"gpus": job.gpus, "gpu": job.gpu, "interconnect": job.interconnect, "params": params,
           "global_batch": samples_per_gpu * job.gpus, "micro_batch": micro, "grad_accum": accum,
           "zero_stage": ds.zero_stage, "precision": ds.precision, "worst_split": [n_ctx, n_tgt],
           "memory_bytes": {**memory, "capacity": capacity}, "grad_checkpoint": checkpointing,
           "grad_checkpoint_setting": cfg.model.grad_checkpoint, "grad_checkpoint_why": why, "steps": steps,
           "comm_bytes": volume, "comm_s": comm_s, "bandwidth_bytes_s": bandwidth, "mfu": job.mfu}
    out["warnings"] = warnings_of(out, cfg)
    return out


def warnings_of(p: dict, cfg: RunConfig) -> list[str]:
    out = []
    mem, ckpt = p["memory_bytes"], p["grad_checkpoint"]
    used = mem["total_checkpointed"] if ckpt else mem["total"]
    if used > FIT * mem["capacity"]:
        fix = ("set model.grad_checkpoint to true or auto"
               if not ckpt and mem["total_checkpointed"] <= FIT * mem["capacity"]
               else "lower data.batch_size (and raise deepspeed.grad_accum), or use a higher ZeRO stage or more GPUs")
        out.append(f"does not fit: {used / GIB:.1f} GiB per GPU of {mem['capacity'] / GIB:.0f} GiB; {fix}")
    elif ckpt and p["grad_checkpoint_setting"] is True and mem["total"] <= 0.85 * mem["capacity"]:
        out.append(f"activation checkpointing unnecessary: {mem['total'] / GIB:.1f} GiB per GPU without it "
                   f"(of {mem['capacity'] / GIB:.0f} GiB); it costs ~1/3 more compute (model.grad_checkpoint=false)")
    for name, s in p["steps"].items():
        if p["comm_s"] > s["compute_s"]:
            out.append(f"communication-bound at the {name} step: {p['comm_s'] * 1e3:.0f} ms of ZeRO-{p['zero_stage']} "
                       f"traffic ({p['comm_bytes'] / 1e9:.2f} GB per GPU) against {s['compute_s'] * 1e3:.0f} ms of "
                       "compute; overlap_comm hides at most the compute time: raise data.batch_size or "
                       "deepspeed.grad_accum, or use a faster interconnect")
            break
    last = p["steps"]["last"]
    if last["p_full_length"] < 1e-3:
        frames = cfg.model.latent_shape[0]
        out.append(f"the curriculum never reaches full clips: P(L={frames}) = {last['p_full_length']:.1e} at the "
                   f"last step ({last['step']}), mean clip length {last['mean_clip_frames']:.1f} of {frames} latent "
                   f"frames ({cfg.objective.t_prior}); raise train.steps or pick another objective.t_prior")
    return out


def format_plan(p: dict) -> str:
    mem = p["memory_bytes"]

    def gib(key: str) -> str:
        return f"{mem[key] / GIB:.2f} GiB"

    lines = [f"{p['gpus']} x {p['gpu']} ({p['interconnect']} between nodes): {p['params'] / 1e6:.1f}M parameters, "
             f"ZeRO-{p['zero_stage']} {p['precision']}, {p['micro_batch']} clips x {p['grad_accum']} micro-batches "
             f"per GPU = {p['global_batch']} clips per step",
             "memory per GPU (worst mask ratio at full length: "
             f"{p['worst_split'][0]} contexts, {p['worst_split'][1]} targets per clip):",
             f"  weights + gradients + optimizer  {gib('model_states')}",
             f"  communication buckets            {gib('buckets')}",
             f"  loss chunk (logits)              {gib('loss_chunk')}",
             f"  activations                      {gib('activations')} "
             f"({gib('activations_checkpointed')} with activation checkpointing)",
             f"  total                            {gib('total')} ({gib('total_checkpointed')} with checkpointing; "
             f"{'on' if p['grad_checkpoint'] else 'off'}: {p['grad_checkpoint_why']}) of {mem['capacity'] / GIB:.0f} GiB"]
    for name, s in p["steps"].items():
        lines.append(f"{name} step ({s['step']}): mean clip {s['mean_clip_frames']:.1f} latent frames, "
                     f"P(full length) {s['p_full_length']:.2g}; {s['flops_per_gpu'] / 1e12:.2f} TFLOP per GPU, "
                     f"~{s['compute_s'] * 1e3:.0f} ms at {p['mfu']:.0%} of peak")
    lines.append(f"communication: {p['comm_bytes'] / 1e9:.2f} GB per GPU per step, ~{p['comm_s'] * 1e3:.0f} ms at "
                 f"{p['bandwidth_bytes_s'] / 1e9:.0f} GB/s")
    lines += [f"warning: {w}" for w in p["warnings"]] or ["no warnings"]
    return "\n".join(lines)
