"""The trainer: DeepSpeed engine (engine.py), AdamW and schedule (optim.py), the loop (loop.py),
checkpoints (checkpoint.py), metrics (metrics.py), preemption (preemption.py).

`gptforge.train.loop.train(cfg)` runs one. This package's import stays light (no DeepSpeed), so reading a
checkpoint's weights (`gptforge.train.checkpoint.load_checkpoint_weights`) costs no DeepSpeed start-up.
"""

from gptforge.train.preemption import EXIT_PREEMPTED

__all__ = ["EXIT_PREEMPTED"]
