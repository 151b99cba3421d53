"""`python -m mebt.train --config FILE [KEY=VALUE ...]`: one training process, as the launchers start them.

The same as `mebt train`, without the CLI: launchers (launchers/local.py) and cluster scripts run this
module with the rendezvous variables set, so the process imports nothing above the train layer.
"""
import argparse
import sys

from mebt.config import load_config
from mebt.errors import UserError, say
from mebt.train.config import RunConfig
from mebt.train.distributed import close_process_group, resolve_env
from mebt.train.loop import REQUEUE_EXIT_CODE, interrupted_line, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mebt.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML run config (e.g. RUN_DIR/launch_config.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(RunConfig, args.config, args.overrides)
        result = train(cfg)
    except UserError as e:
        say(f"mebt: error: {e}")
        return 2
    except KeyboardInterrupt:   # one line, from rank 0 only: every worker of a launch got the Ctrl-C
        if resolve_env().rank == 0:
            say(interrupted_line(cfg.train.run_dir))
        return 130
    finally:   # every exit: gloo's threads left to interpreter shutdown sometimes abort a finished process
        close_process_group()
    return REQUEUE_EXIT_CODE if result["preempted"] else 0


if __name__ == "__main__":
    sys.exit(main())
