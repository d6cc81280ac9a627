"""The trainer: one `Trainer` and its loop (loop.py) running a task (task.py: the hooks; pretrain.py:
pretraining; fine-tuning's tasks are in gptforge.finetune.tasks); process start-up and the layout check
(distributed.py), batch planning (batch.py), precision (precision.py), DeepSpeed's config and engine
(engine.py), AdamW and schedule (optim.py), checkpoints (checkpoint.py), metrics (metrics.py), preemption
(preemption.py), the dry run (dry_run.py).

`gptforge.train.loop.train(cfg)` runs one. This package's import stays light (no DeepSpeed), so reading a
checkpoint's weights (`gptforge.checkpoint_format.load_checkpoint_weights`) costs no DeepSpeed start-up.
"""

from gptforge.train.preemption import EXIT_PREEMPTED

__all__ = ["EXIT_PREEMPTED"]
