"""`python -m mebt.train --config FILE [KEY=VALUE ...]`: one training process, as the launchers start them.

The same as `mebt train`, without the CLI: launchers (launchers/local.py) and cluster scripts run this
module with the rendezvous variables set, so the process imports nothing above the train layer.
"""
import argparse
import sys

from mebt.config import load_config
from mebt.errors import UserError
from mebt.train.config import RunConfig
from mebt.train.loop import REQUEUE_EXIT_CODE, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mebt.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML run config (e.g. RUN_DIR/launch_config.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        result = train(load_config(RunConfig, args.config, args.overrides))
    except UserError as e:
        print(f"mebt: error: {e}", file=sys.stderr)
        return 2
    if result["preempted"]:
        print(f"mebt: stopped by {result['preempted']} at step {result['step']} after a checkpoint; rerun the same "
              f"command to resume (exit code {REQUEUE_EXIT_CODE} asks a launcher to requeue)", file=sys.stderr)
        return REQUEUE_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
