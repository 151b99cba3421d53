"""Training-step time and activation memory vs sequence length: MeBT against full attention.

One step is forward + cross-entropy on the targets (chunked, as in training) + backward (gradients set to None first, no optimizer).
The mask ratio is fixed at 0.5, the mean of the linear schedule: half of a random permutation of the grid
are contexts, the other half targets. The grid for N tokens is (N/256, 16, 16), i.e. N/256 latent frames.

Activation memory is the total size of the distinct tensor storages autograd saves for backward
(parameters excluded), which is device independent; on CUDA the peak allocation during the step above
what was allocated before it is reported too.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import (
    Setup,
    add_common_args,
    autocast,
    interleaved,
    print_table,
    print_target,
    ratio,
    run_benchmark,
    seconds,
)
from mebt.core.baselines import FullAttentionTransformer
from mebt.core.model import MeBT, MeBTConfig
from mebt.core.objective import chunked_masked_loss

MODELS = {"mebt": MeBT, "full": FullAttentionTransformer}
MIB = 2 ** 20


def make_batch(n_tokens: int, batch_size: int, vocab: int, device: torch.device, generator: torch.Generator):
    """Random codes and a 50/50 context/target split of a random permutation per sample."""
    codes = torch.randint(0, vocab, (batch_size, n_tokens), generator=generator)
    perm = torch.stack([torch.randperm(n_tokens, generator=generator) for _ in range(batch_size)])
    half = n_tokens // 2
    return codes.to(device), perm[:, :half].to(device), perm[:, half:].to(device)


def forward_loss(model, batch, bf16: bool) -> torch.Tensor:
    """The training loss as `mebt train` computes it: the head and cross-entropy in chunks whose logits are
    recomputed in backward, so neither model keeps [targets x vocab] logits (identical for both anyway)."""
    codes, ctx, tgt = batch
    with autocast(codes.device, bf16):
        return chunked_masked_loss(model.features(codes, ctx, tgt), model.head, codes, tgt)[0]


def train_step(model, batch, bf16: bool) -> None:
    model.zero_grad(set_to_none=True)
    forward_loss(model, batch, bf16).backward()


def saved_activation_bytes(model, batch, bf16: bool) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward during one step."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:   # weights (and their transposed views) are not activations
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward_loss(model, batch, bf16)
    loss.backward()
    return sum(saved.values())


def memory(model, batch, bf16: bool) -> dict:
    """Activation memory of one step; the pass doubles as warm-up (allocator, kernel selection)."""
    device = batch[0].device
    out = {"saved_mib": saved_activation_bytes(model, batch, bf16) / MIB}
    if device.type == "cuda":
        model.zero_grad(set_to_none=True)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        seconds(lambda: train_step(model, batch, bf16), device)
        out["peak_mib"] = (torch.cuda.max_memory_allocated(device) - before) / MIB
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=None,
                   help="sequence lengths N, multiples of 256 (default 1024 2048 4096 8192)")
    p.add_argument("--iters", dest="repeats", type=int, help="the same as --repeats: timed steps per case, every "
                   "case in turn (min and median reported; default 5)")
    p.add_argument("--budget", type=float, default=30.0,
                   help="seconds after which a case stops adding timed steps (at least one is run)")
    p.add_argument("--batch-size", type=int, default=1)
    add_common_args(p)
    p.set_defaults(repeats=5)
    args = p.parse_args(argv)
    if args.tokens is None:
        args.tokens = [256, 512] if args.quick else [1024, 2048, 4096, 8192]
    bad = [n for n in args.tokens if n < 256 or n % 256]
    if bad:
        p.error(f"--tokens must be multiples of 256 (the grid is N/256 x 16 x 16), got {bad[0]}")
    args.tokens = sorted(set(args.tokens))
    return args


def main(argv=None) -> dict:
    return run_benchmark(parse_args(argv), run)


def run(args: argparse.Namespace, env: Setup) -> dict:
    device, bf16 = env.device, env.bf16
    generator = torch.Generator().manual_seed(args.seed)
    print(f"{env.header()}; batch {args.batch_size}; mask ratio 0.5; {args.repeats} interleaved steps per case "
          "(min / median; time ratios from the min)")

    # Every (N, model) case is built first and then timed in turn, one step each round: the sizes are
    # compared under the same load (timed minutes apart, time(8192)/time(1024) ranged 2.1 to 42.5 here).
    rows, steps = [], {}
    for n in args.tokens:
        cfg = MeBTConfig(latent_shape=(n // 256, 16, 16), numerics="preln", **env.dims)
        batch = make_batch(n, args.batch_size, cfg.vocab_size, device, generator)
        row = {"tokens": n}
        for name, cls in MODELS.items():
            torch.manual_seed(args.seed)
            model = cls(cfg).to(device).train()
            row[name] = memory(model, batch, bf16)
            steps[n, name] = lambda model=model, batch=batch: train_step(model, batch, bf16)
        rows.append(row)
    timing = interleaved(steps, args.repeats, device, budget_s=args.budget)
    for row in rows:
        for name in MODELS:
            t = timing[row["tokens"], name]
            row[name].update(ms=1000 * t["min"], ms_median=1000 * t["median"], iters=len(t["runs"]))
        row["time_ratio"] = ratio(row["full"]["ms"], row["mebt"]["ms"])
        row["mem_ratio"] = ratio(row["full"]["saved_mib"], row["mebt"]["saved_mib"])
        print(f"  N={row['tokens']}: mebt {row['mebt']['ms']:.1f} ms, full {row['full']['ms']:.1f} ms", flush=True)

    cuda = device.type == "cuda"
    headers = ["N", "mebt ms min / med", "full ms min / med", "time ratio", "mebt MiB", "full MiB", "mem ratio"]
    headers += ["mebt peak MiB", "full peak MiB"] if cuda else []
    table = []
    for r in rows:
        cells = [str(r["tokens"]), f"{r['mebt']['ms']:.1f} / {r['mebt']['ms_median']:.1f}",
                 f"{r['full']['ms']:.1f} / {r['full']['ms_median']:.1f}", f"{r['time_ratio']:.2f}",
                 f"{r['mebt']['saved_mib']:.1f}", f"{r['full']['saved_mib']:.1f}", f"{r['mem_ratio']:.2f}"]
        cells += [f"{r['mebt']['peak_mib']:.1f}", f"{r['full']['peak_mib']:.1f}"] if cuda else []
        table.append(cells)
    print("activation MiB = storages saved for backward (parameters excluded)")
    print_table(headers, table)

    first, last = rows[0], rows[-1]
    scaling = ratio(last["mebt"]["ms"], first["mebt"]["ms"])
    print(f"mebt time(N={last['tokens']}) / time(N={first['tokens']}) = {scaling:.2f}")
    print(f"targets (the paper's claims, at N=8192; measured at N={last['tokens']}):")
    print_target("full/mebt time", last["time_ratio"], ">=", 4)
    print_target("full/mebt activation memory", last["mem_ratio"], ">=", 4)
    print_target(f"mebt time({last['tokens']})/time({first['tokens']})", scaling, "<=", 9)

    return {"benchmark": "train_scaling", **env.describe(), "batch_size": args.batch_size, "mask_ratio": 0.5,
            "rows": rows, "mebt_time_scaling": scaling}


if __name__ == "__main__":
    main()
