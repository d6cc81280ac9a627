"""torchrun --nproc_per_node=N tests/workers/ckpt_memory.py CONFIG.yaml OUT_DIR [key=value ...]

Peak RSS of each rank over a training step without a save and over one with a save (the peak is reset
to the current RSS before each through /proc/self/clear_refs), and the bytes the rank's save wrote:
OUT_DIR/rank<R>.json.
The trainer is built as launch/train.py builds it; the steps go through DeepSpeed's engine directly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from gptforge.cli import quiet_deepspeed, setup_rank_logging
from gptforge.config import config_to_dict, load_config


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS starts again from the current RSS


def main() -> None:
    setup_rank_logging()
    quiet_deepspeed()
    from gptforge.train import checkpoint
    from gptforge.train.fragments import owned_fragments
    from gptforge.train.loop import Trainer

    config, out, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    trainer = Trainer(load_config(config, overrides), "none")
    engine, cfg = trainer.engine, trainer.cfg
    vocab, ctx, micro = cfg.model.vocab_size, cfg.model.context_length, cfg.train.micro_batch_size
    gen = torch.Generator().manual_seed(dist.get_rank())

    def step() -> None:
        x = torch.randint(0, vocab, (micro, ctx), generator=gen)
        _, loss = engine(x, x)
        engine.backward(loss)
        engine.step()
        trainer.state.step += 1

    for _ in range(2):  # AdamW's state exists from here on; the allocator has seen a step
        step()
    layout = trainer.layout() if callable(trainer.layout) else trainer.layout
    meta = checkpoint.checkpoint_meta(cfg.model, {}, "", "", layout, config_to_dict(cfg))
    results = {}
    for name, save in (("without", False), ("with", True), ("without_again", False), ("with_again", True)):
        dist.barrier()
        reset_peak()
        step()
        if save:
            trainer.checkpoints.save(engine, trainer.state, meta, trainer.model_cfg, trainer.dist.topology)
            trainer.checkpoints.wait()
        results[name] = peak_rss()
    topo = trainer.dist.topology
    written = sum(f.values.numel() * 4 for f in owned_fragments(engine, trainer.model_cfg, topo, True))
    results["written_bytes"] = written
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    trainer.checkpoints.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
