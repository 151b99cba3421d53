"""The `mebt` command line: a table of commands, each a typed config dataclass and a function of it.

Every command takes ``--config FILE.yaml`` (or a packaged config name), dotted ``key=value`` overrides
and flags generated from its dataclass (``mebt.flags``); ``mebt COMMAND --help`` lists every field with its
default and doc. A command's config class is imported only when that command runs (or shows its help),
so `mebt --help` stays instant. The benchmarks are the exception: `mebt bench NAME ARGS` hands ARGS to
the benchmark script's own flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from pathlib import Path

from mebt.errors import Interrupted, UserError, say
from mebt.flags import Command, add_command, build_config, format_config, parse_args
from mebt.logs import default_level, setup_logging

BENCHMARKS = {
    "train-scaling": ("benchmarks.train_scaling", "training step time and activation memory vs tokens, MeBT vs full attention"),
    "generation": ("benchmarks.generation", "generation time, MeBT sampling vs autoregressive with KV cache"),
    "preprocess": ("benchmarks.preprocess_throughput", "preprocessing clips/s: decode, tokenize, write shards"),
    "loader": ("benchmarks.loader_throughput", "streaming loader clips/s vs an in-memory bound"),
    "pretokenized": ("benchmarks.pretokenized", "training from codes vs re-encoding (and decoding) every clip"),
    "gpu": ("benchmarks.gpu_check", "the GPU check: paper-width MFU, MeBT vs full attention and AR, loader, one JSON"),
}


# --- what each command does with its config -----------------------------------------------------------------

def run_train(cfg) -> int:
    from mebt.train.loop import REQUEUE_EXIT_CODE, interrupted_line, train

    try:
        result = train(cfg)
    except KeyboardInterrupt:
        raise Interrupted(interrupted_line(cfg.train.run_dir)) from None
    return REQUEUE_EXIT_CODE if result["preempted"] else 0


def run_plan(job) -> None:
    from mebt.fsutil import write_json
    from mebt.train.plan import format_plan, plan

    result = plan(job)
    print(format_plan(result))
    if job.json:
        write_json(job.json, result)


def run_launch_local(job) -> int:
    from launchers.local import launch_local

    return launch_local(job.run_config(), job.nproc)


def run_launch_slurm_train(job) -> None:
    from launchers.slurm import submit_train
    from mebt.train.config import RunConfig

    submit_train(job.job_config(RunConfig), job.slurm, dry_run=job.dry_run, local=job.local)


def run_launch_slurm_preprocess(job) -> None:
    from data_pipeline.preprocess import PreprocessConfig
    from launchers.slurm import submit_preprocess

    submit_preprocess(job.job_config(PreprocessConfig), job.num_tasks, job.slurm, dry_run=job.dry_run, local=job.local)


def run_launch_slurm_eval(job) -> None:
    from launchers.slurm import submit_eval
    from mebt.eval.evaluate import EvalJob

    submit_eval(job.job_config(EvalJob), job.slurm, dry_run=job.dry_run, local=job.local)


def run_launch_status(cfg) -> None:
    from launchers.slurm import status

    report = status(cfg.run_dir, lines=cfg.lines)
    for key in ("job_id", "kind", "state", "code", "checkpoint", "last_logged", "dataset", "reports"):
        if key in report:
            print(f"{key}: {json.dumps(report[key]) if isinstance(report[key], dict) else report[key]}")
    print(f"--- stdout (last {cfg.lines} lines)\n{report['stdout_tail']}\n--- stderr (last {cfg.lines} lines)\n"
          f"{report['stderr_tail']}")


def run_eval(job) -> None:
    result = job()
    if job.watch:
        print(f"evaluated {len(result)} checkpoint(s) of {job.watch}")
        return
    print(json.dumps({k: result.get(k) for k in ("complete", "step", "metrics", "note", "out_dir", "mlflow")}, indent=2))


def run_fvd(cfg) -> None:
    from mebt.eval.fvd_sets import fvd_between
    from mebt.train.distributed import pick_device

    result = fvd_between(cfg.real, cfg.fake, protocol=cfg.protocol, frames=cfg.frames, runs=cfg.runs, i3d=cfg.i3d,
                         json_path=cfg.json, features_out=cfg.features_out, device=pick_device(cfg.device),
                         batch_size=cfg.batch_size)
    p = result["protocol"]
    print(json.dumps(result["metrics"], indent=2))
    print(f"protocol {p['name']}: {p['real']} real vs {p['runs']} x {p['generated_per_run']} fake videos of "
          f"{p['frames']} frames, I3D {p['i3d']['network']} ({p['i3d']['numerics']} numerics)"
          + (f"; record in {cfg.json}" if cfg.json else ""))


def run_runs_list(cfg) -> None:
    from mebt.eval.runs import LIST_COLUMNS, format_table, list_runs

    print(format_table(list_runs(cfg.tracking_uri, cfg.experiment, cfg.filter, cfg.max_runs), LIST_COLUMNS))


def run_runs_sync(cfg) -> None:
    from mebt.errors import UserError
    from mebt.train.checkpoint import saved_meta
    from mebt.train.metrics_sync import sync_run
    from mebt.train.tracking import mlflow_client, recorded_run_id, recorded_tracking_uri

    run_dir = Path(cfg.run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise UserError(f"'{run_dir}' has no metrics.jsonl; give the run dir of a mebt train run")
    uri = cfg.tracking_uri or recorded_tracking_uri(run_dir)
    run_id = cfg.run_id or recorded_run_id(run_dir) or (saved_meta(run_dir) or {}).get("mlflow_run_id")
    if not uri or not run_id:
        raise UserError(f"'{run_dir}' records no MLflow {'store' if not uri else 'run id'}; pass --tracking-uri and "
                        "--run-id")
    print(json.dumps({**sync_run(run_dir, mlflow_client(uri), run_id), "tracking_uri": uri}))


def run_runs_compare(cfg) -> None:
    from mebt.eval.runs import compare_runs

    result = compare_runs(cfg.tracking_uri, cfg.experiment, cfg.metric, cfg.filter, cfg.max_runs, cfg.plot)
    print(result["table"])
    if result["plot"]:
        print(f"plot: {result['plot']}")


def run_demo(cfg) -> None:
    from mebt.demo import Demo

    Demo(cfg).run()


def run_export(cfg) -> None:
    from mebt.train.checkpoint import export

    result = export(cfg.checkpoint, cfg.out)
    print(f"wrote {result['out']}: step {result['step']} ({result['tag']}), {result['params'] / 1e6:.2f}M fp32 "
          "parameters, loadable with mebt.core.model_file.load_model (no DeepSpeed needed)")


def run_tokenizer_train(cfg) -> None:
    from mebt.train.tokenizer import train_tokenizer_on_videos

    result = train_tokenizer_on_videos(cfg)
    print(f"tokenizer: {result['psnr']:.2f} dB held-out PSNR (from {result['psnr_start']:.2f}); wrote {result['tokenizer']}")


def run_convert_official(cfg) -> None:
    from mebt.core.convert_official import convert_official_file

    m = convert_official_file(cfg.checkpoint, cfg.out, n_head=cfg.n_head, latent_shape=cfg.latent_shape,
                              layer_plan=cfg.layer_plan)
    print(f"wrote {cfg.out}: MeBT {m.n_layer} layers, width {m.n_embd}, {m.n_head} heads, {m.n_latent} latents, "
          f"grid {list(m.latent_shape)}, vocab {m.vocab_size}, numerics {m.numerics}")


def run_preprocess(cfg) -> None:
    from data_pipeline.preprocess import preprocess

    print(json.dumps(preprocess(cfg), indent=2))


def run_data_merge(cfg) -> None:
    from data_pipeline.manifest import merge_manifest

    print(f"merged manifest in {cfg.dir}: {merge_manifest(cfg.dir)}")


def run_data_synth(cfg) -> None:
    from data_pipeline.synthetic_videos import SynthConfig, write_synthetic_dataset
    from mebt.config import as_base

    result = write_synthetic_dataset(cfg.out, as_base(cfg, SynthConfig))
    print(f"{result['out_dir']}: {result['written']} videos written, {result['skipped']} already there; "
          f"train {result['train']}, test {result['test']}")


def run_data_synth_codes(cfg) -> None:
    from data_pipeline.synthetic_code_shards import CodeDatasetConfig, write_code_dataset
    from mebt.config import as_base

    counts = write_code_dataset(cfg.out, as_base(cfg, CodeDatasetConfig))
    print(f"{cfg.out}: {counts['clips']} clips of {'x'.join(map(str, cfg.grid))} codes (vocab {cfg.vocab_size}) "
          f"in {counts['shards']} shards")


def run_data_verify(cfg) -> int:
    from data_pipeline.verify import verify_dataset

    report = verify_dataset(cfg.dir)
    for line in report.lines():
        print(line)
    print(report.summary())
    return 0 if report.ok else 1


def run_data_stats(cfg) -> None:
    from data_pipeline.verify import dataset_stats, format_stats
    from mebt.fsutil import write_json

    stats = dataset_stats(cfg.dir)
    print(format_stats(stats))
    if cfg.json:
        write_json(cfg.json, stats)


# --- command-specific defaults, applied to the merged settings before the dataclass is built --------------

def _eval_defaults(data: dict) -> dict:
    """Sampling: the run's own section unless overridden (evaluate() reads it when nothing is given);
    sampling.KEY=VALUE go on top of the run's section, or of a published preset with --preset NAME."""
    config = data.setdefault("config", {})
    if data.get("preset"):
        config.setdefault("sampling", {}).setdefault("preset", data["preset"])
    elif config.get("sampling"):
        from mebt.eval.evaluate import run_sampling

        base = run_sampling(config.get("checkpoint") or data.get("watch") or "")
        if base:
            config["sampling"] = {**base, **config["sampling"]}
    return data


def _train_defaults(data: dict) -> dict:
    """The model's code grid and vocabulary, and the tokenizer, from the dataset unless the config sets them."""
    from mebt.train.config import defaults_from_dataset

    return defaults_from_dataset(data)


def _preprocess_defaults(data: dict) -> dict:
    """Clips at every start one clip length apart (the whole video, once); a SLURM array task's slice."""
    import os

    clip = data.setdefault("clip", {})
    clip.setdefault("starts", "all")
    clip.setdefault("all_stride", clip.get("sequence_length", 16) * clip.get("frame_stride", 1))
    data.setdefault("task_index", int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)))
    data.setdefault("num_tasks", int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1)))
    return data


def _slurm_preprocess_defaults(data: dict) -> dict:
    clip = data.setdefault("clip", {})
    clip.setdefault("starts", "all")
    clip.setdefault("all_stride", clip.get("sequence_length", 16) * clip.get("frame_stride", 1))
    return data


# --- the table ---------------------------------------------------------------------------------------------

C = "mebt.commands"
COMMANDS = [
    Command(("train",), "mebt.train.config:RunConfig", run_train, "train MeBT with DeepSpeed from preprocessed shards",
            "Train MeBT, e.g. `mebt train --config tiny train.steps=100`. One process with no launcher, or many "
            "under torchrun, the deepspeed launcher or srun (the same command). A run directory holding a "
            "checkpoint is resumed automatically; SIGTERM/SIGUSR1/SIGUSR2 checkpoint and exit with code 75. "
            "model.latent_shape and model.vocab_size default to the dataset's.", prepare=_train_defaults),
    Command(("plan",), "mebt.train.plan:PlanJob", run_plan,
            "memory, time and communication per GPU of a training config on a cluster, with warnings",
            "Before a job starts: per-GPU memory (weights, gradients, optimizer partitions, buckets, activations "
            "with and without checkpointing, the loss chunk), FLOPs and time per step, ZeRO communication, the "
            "clip-length curriculum at the first and last step, and warnings (does not fit, communication-bound, "
            "curriculum never reaches full length, checkpointing unnecessary). E.g. `mebt plan --config "
            "sky_128f --gpus 32 --gpu h100-80gb --interconnect 400gbps`.", prepare=_train_defaults),
    Command(("launch", "slurm", "train"), "launchers.slurm:SlurmTrainJob", run_launch_slurm_train,
            "mebt train on NODES x TASKS processes, requeued after preemption",
            "The same config as `mebt train` plus the SLURM options; checked before submitting. The resolved "
            "config travels with the job.", prepare=_train_defaults),
    Command(("launch", "slurm", "preprocess"), "launchers.slurm:SlurmPreprocessJob", run_launch_slurm_preprocess,
            "mebt preprocess as a job array (--num-tasks slices)",
            "The same options as `mebt preprocess` plus the SLURM options; --num-tasks is the array size. A rerun "
            "only redoes missing shards; the task that finishes last merges the manifest.",
            positional=("input_dir",), prepare=_slurm_preprocess_defaults),
    Command(("launch", "slurm", "eval"), "launchers.slurm:SlurmEvalJob", run_launch_slurm_eval,
            "mebt eval as its own job (e.g. --watch RUN_DIR beside training)",
            "The same options as `mebt eval` plus the SLURM options.", prepare=_eval_defaults),
    Command(("launch", "status"), f"{C}:StatusConfig", run_launch_status, "state, progress and log tail of a job",
            "Reads RUN_DIR/launch.json (written at submission) and asks SLURM.", positional=("run_dir",)),
    Command(("launch", "local", "train"), "launchers.local:LocalTrainJob", run_launch_local,
            "train with --nproc processes on this machine (no SLURM or torchrun)",
            "Exit code: 0, 75 when stopped by a signal after a checkpoint (rerun to resume), or the first failure's.",
            prepare=_train_defaults),
    Command(("eval",), "mebt.eval.evaluate:EvalJob", run_eval,
            "sample, decode and score a checkpoint (FVD/KVD), or watch a run",
            "Sample videos from a checkpoint (model file, run dir or DeepSpeed checkpoint), decode them, score them "
            "with FVD/KVD against real clips (--real-dir) with the standard I3D (or --i3d FILE), write report.json "
            "and an MP4/GIF grid, and log eval/* into the training's MLflow run. Resumable. Sampling: --preset "
            "NAME and/or sampling.KEY=VALUE.", prepare=_eval_defaults),
    Command(("fvd",), f"{C}:FVDConfig", run_fvd, "FVD/KVD between two folders of videos (score any model's samples)",
            "FVD and KVD of the videos in FAKE against those in REAL, with the standard I3D and the protocols of "
            "`mebt eval`. Each folder holds video files or .npy uint8 arrays [T, H, W, 3], one video per file, "
            "in sorted name order; frames are resized to 224x224 inside (not when already 224x224).",
            positional=("real", "fake")),
    Command(("runs", "list"), f"{C}:RunsConfig", run_runs_list, "runs with status, duration, last step and metrics"),
    Command(("runs", "compare"), f"{C}:RunsConfig", run_runs_compare,
            "the params that differ, best and last metrics, a plot"),
    Command(("runs", "sync"), f"{C}:SyncConfig", run_runs_sync, "send a run's metrics that MLflow missed",
            "Send the points of RUN_DIR/metrics.jsonl (the run's own record) that its MLflow run lacks, e.g. after "
            "the tracking server was away when the run ended. Points are known by (key, step): running it again "
            "sends nothing.", positional=("run_dir",)),
    Command(("demo",), "mebt.demo:DemoConfig", run_demo,
            "from nothing to generated videos: every stage of mebt on this machine",
            "Synthesize videos, train a small tokenizer, preprocess into verified shards, train MeBT with DeepSpeed "
            "(2 processes) tracked in MLflow, export, sample, decode, evaluate (held-out loss, FVD/KVD with "
            "reference points), and write a real/conditional/unconditional grid. Finished stages are reused."),
    Command(("export",), f"{C}:ExportConfig", run_export, "consolidate a training checkpoint into one fp32 model file",
            positional=("checkpoint", "out")),
    Command(("tokenizer", "train"), "mebt.train.tokenizer:TokenizerRunConfig", run_tokenizer_train,
            "train a 3D VQGAN on videos (resumes from its run directory)",
            "Train a TATS-architecture 3D VQGAN, e.g. `mebt tokenizer train --config tokenizer_tiny "
            "train.steps=500`. Writes RUN_DIR/tokenizer.ckpt and reports held-out PSNR."),
    Command(("convert-official",), f"{C}:ConvertConfig", run_convert_official, "import an official MeBT checkpoint",
            "Convert an official MeBT Lightning checkpoint into a mebt model file with the official numerics. Heads, "
            "code grid and layer plan come from the checkpoint's hyper_parameters; a flag that contradicts them is "
            "an error.", positional=("checkpoint", "out")),
    Command(("preprocess",), "data_pipeline.preprocess:PreprocessConfig", run_preprocess,
            "tokenize videos into WebDataset shards + Parquet manifest",
            "Videos -> clips -> tokenizer codes -> tar shards PREFIX-000000.tar, manifest.parquet, shards.parquet "
            "and dataset.json. Resumable. A SLURM array splits the shards with --task-index/--num-tasks (default: "
            "SLURM_ARRAY_TASK_ID/COUNT); the task that finishes last merges the manifest (or `mebt data merge`).",
            positional=("input_dir",), prepare=_preprocess_defaults),
    Command(("data", "synth"), "data_pipeline.synthetic_videos:SynthJob", run_data_synth,
            "write a procedural synthetic video dataset (mp4 + splits)", positional=("out",)),
    Command(("data", "synth-codes"), "data_pipeline.synthetic_code_shards:CodeDatasetJob", run_data_synth_codes,
            "write procedural code grids as a sharded dataset (no tokenizer)", positional=("out",)),
    Command(("data", "verify"), f"{C}:DatasetDirConfig", run_data_verify,
            "check every shard against the manifest; non-zero exit names bad shards", positional=("dir",)),
    Command(("data", "stats"), f"{C}:StatsConfig", run_data_stats, "counts, grid, bytes and code usage of a dataset",
            positional=("dir",)),
    Command(("data", "merge"), f"{C}:DatasetDirConfig", run_data_merge,
            "merge the manifest parts of a preprocessed dataset's finished tasks", positional=("dir",)),
]
GROUPS = {"launch": "run jobs on SLURM (submitit) or as local processes; follow them",
          "launch slurm": "submit a job to SLURM through submitit", "launch local": "local processes",
          "runs": "list and compare MLflow runs", "tokenizer": "the 3D VQGAN tokenizer",
          "data": "datasets: synthesize videos or codes, verify, describe and merge shards"}


def _resolve(command: Command) -> Command:
    module, name = command.config.split(":")
    return dataclasses.replace(command, config=getattr(importlib.import_module(module), name))


GLOBAL_WITH_VALUE = ("--log-level", "--local_rank", "--local-rank")


def _selected(argv: list[str]) -> Command | None:
    """The command that ``argv`` names (its leading words), so that only its config class is imported."""
    words, skip = [], False
    for arg in argv:
        if skip or arg.startswith("-"):
            skip = arg in GLOBAL_WITH_VALUE
            continue
        words.append(arg)
    for command in COMMANDS:
        if tuple(words[:len(command.path)]) == command.path:
            return command
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mebt", description="Train, sample and benchmark MeBT video models.",
                                     allow_abbrev=False)   # else --local would be read as --local_rank
    # The deepspeed launcher passes --local_rank=N before the subcommand (it also sets LOCAL_RANK, which is used).
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging level (default: $MEBT_LOG_LEVEL, else INFO; ranks > 0 log warnings and errors "
                             "only unless DEBUG)")
    selected = _selected(argv if argv is not None else sys.argv[1:])
    groups = {(): parser.add_subparsers(dest="command", required=True, metavar="COMMAND")}
    for command in COMMANDS:
        for depth in range(1, len(command.path)):
            key = command.path[:depth]
            if key not in groups:
                text = GROUPS.get(" ".join(key), "")
                groups[key] = groups[key[:-1]].add_parser(key[-1], help=text, description=text).add_subparsers(
                    dest=f"command_{depth}", required=True, metavar="COMMAND")
        sub = groups[command.path[:-1]].add_parser(command.path[-1], help=command.help,
                                                   description=command.description or command.help,
                                                   allow_abbrev=False)
        if command is selected:
            add_command(sub, _resolve(command))
    bench = groups[()].add_parser("bench", help="run a benchmark and print its table",
                                  description="Benchmarks: " + "; ".join(f"{k}: {v[1]}" for k, v in BENCHMARKS.items())
                                  + ". Arguments after the name go to the benchmark (`mebt bench NAME --help`).")
    bench.add_argument("name", choices=sorted(BENCHMARKS))
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="benchmark arguments")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(build_parser(argv), argv)
    setup_logging(args.log_level or default_level())
    try:
        if args.command == "bench":
            from mebt.bench import load_benchmark

            load_benchmark(BENCHMARKS[args.name][0]).main(args.bench_args)   # prints its table; returns the rows
            return 0
        cfg = build_config(args)
        if args._print_config:
            print(format_config(cfg))
            return 0
        return args._command.run(cfg) or 0
    except UserError as e:
        say(f"mebt: error: {e}")
        return 2
    except Interrupted as e:
        if str(e):
            say(str(e))
        return e.code
    except KeyboardInterrupt:   # every long job keeps what it finished (shards, batches, features, stages)
        say("mebt: interrupted; finished work is kept: run the same command to resume")
        return 130   # 128 + SIGINT, as a shell reports it
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """On every exit, success included: left to interpreter shutdown, gloo's threads abort 2-process runs
    now and then ("terminate called without an active exception", SIGABRT) after they finished."""
    if "deepspeed" in sys.modules:   # only a training process has a process group to tear down
        from mebt.train.distributed import close_process_group

        close_process_group()


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
