"""Stage two: train a student from cached soft targets. The teacher is never run here.

``run(config)`` drives ``stages.trainer.Trainer`` through its shape, each step in the module named for it:

    setup   stages.train_inputs   the dataset, its caches and the student checked against each other, the loaders;
            stages.train_outputs  the run directory: config.json written, or the interrupted run resumed
    train   stages.trainer        progressive hidden-state stages, then the logit stage; metrics.csv rows every
                                  --log-every steps, a checkpoint every --checkpoint-every steps and at each epoch end
    save    stages.train_outputs  weights, ONNX, metrics.json last (``stages.run_dir`` owns the directory's files)
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from stages import distributed
from stages.config import TrainStudentConfig
from stages.errors import PipelineError
from stages.trainer import Trainer


def run(config: TrainStudentConfig, progress: bool = True, log=print) -> dict:
    """Set up (every check before anything is written), train, save; returns the final metrics.

    progress: a progress bar, the setup line and one line per epoch; False (--quiet) logs only the summary line.
    Under torchrun every rank trains its share of each epoch under DistributedDataParallel; rank 0 alone writes
    the run directory, evaluates and exports, and a failure on any rank fails every rank.
    """
    cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    group = distributed.init(config.dist_timeout, backend="nccl" if cuda else "gloo")
    trainer = Trainer(config, progress and (group is None or group.main), log, group)
    refused_untrained = False
    try:
        distributed.together(group, "setup", trainer.setup)
        with group.collective("training") if group is not None else nullcontext():
            trainer.follow_rank_zero()
            trainer.train()
        metrics = distributed.together(group, "saving the run", trainer.save)
    except PipelineError:
        refused_untrained = trainer.step == 0  # a check that fails at the first batch leaves no run behind
        raise
    finally:
        trainer.close()
        if refused_untrained:
            trainer.outputs.discard()
    distributed.close(group)
    return metrics
