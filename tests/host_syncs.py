"""Host reads of tensors in the training step, counted: each process of a training run of
tests/test_engine.py runs this module instead of `mebt train`.

``python -m tests.host_syncs RUN_DIR KEY=VALUE ...`` trains twice in one process, SHORT and 2 x SHORT steps
with a single log step (the last), and prints one JSON line: per run, the final loss and how often the
training step's code read a tensor on the host (``item``, ``tolist``, ``cpu``, ``numpy``, ``int()``,
``float()``, ``bool()``), by file:function:method. A read per micro-batch makes the longer run's count
larger; reads at the log step, the checkpoint and the end are the same in both.
"""
import json
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WATCHED = {str(ROOT / path) for path in ("mebt/train/loop.py", "mebt/train/distributed.py", "mebt/core/objective.py",
                                         "mebt/core/model.py")}
HOST_SIDE = {"sample_masks", "clip_length_probs", "slot_seeds"}   # masks come from CPU generators and loader data
READS = ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")
TORCH = str(Path(torch.__file__).parent)
SHORT = 3

counts: Counter = Counter()


def _counting(name: str, read):
    def wrapper(self, *args, **kwargs):
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith(TORCH):   # f"{t:.3f}" reads in torch
            frame = frame.f_back
        if frame is not None and frame.f_code.co_filename in WATCHED and frame.f_code.co_name not in HOST_SIDE:
            counts[f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}:{name}"] += 1
        return read(self, *args, **kwargs)
    return wrapper


def main(run_dir: str, overrides: list[str]) -> None:
    from mebt.config import load_config
    from mebt.train.config import RunConfig
    from mebt.train.loop import train

    for name in READS:
        setattr(torch.Tensor, name, _counting(name, getattr(torch.Tensor, name)))
    runs = {}
    for steps in (SHORT, 2 * SHORT):
        counts.clear()
        cfg = load_config(RunConfig, None, [*overrides, f"train.steps={steps}", f"train.log_every={steps}",
                                            f"train.run_dir={run_dir}/steps{steps}"])
        result = train(cfg)
        runs[steps] = {"reads": dict(counts), "final_loss": result["final_loss"]}
    print(json.dumps(runs))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
