"""Convert a training checkpoint of any parallel layout into one consolidated model, on CPU.

    python launch/convert_checkpoint.py --checkpoint runs/gpt2-1.5b --output models/gpt2-1.5b
    python launch/convert_checkpoint.py --checkpoint runs/gpt2-1.5b/checkpoints/step_20000 --to hf --output hf/1.5b

`--checkpoint` takes a run directory (its latest checkpoint), its checkpoints/ directory or one step_<N>
directory, written under any (dp, tp, pp, ZeRO) layout. The weights come from the checkpoint's
`universal/` files (fp32, tensor-parallel shards merged, pipeline stages joined, vocabulary padding
dropped), so no GPU, DeepSpeed process group or the original number of ranks is needed.

`--to gptforge` (default) writes our consolidated model directory (model.safetensors + gptforge.json),
which generate, eval, export and `model.init_from` read; `--to hf` writes a Hugging Face GPT-2 directory
(what launch/export.py writes) that `transformers.GPT2LMHeadModel.from_pretrained` loads.
"""

from __future__ import annotations

import argparse
import logging

from gptforge.cli import output_dir, run_cli, setup_logging
from gptforge.errors import GptforgeError

log = logging.getLogger("convert")


def describe_source(spec: str) -> str:
    """`step 5 of a 4-rank run: dp 1 x pp 2 x tp 2, ZeRO-0` for a training checkpoint, else the path."""
    from gptforge.train import checkpoint

    try:
        step_dir = checkpoint.resolve(spec)
        meta = checkpoint.read_meta(step_dir)
    except GptforgeError:
        return spec
    layout = meta["layout"]
    return (
        f"{step_dir} (step {meta['step']} of a {layout['world_size']}-rank run: dp {layout['dp']} x "
        f"pp {layout['pp']} x tp {layout['tp']}, ZeRO-{layout['zero_stage']})"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="run directory or checkpoint")
    parser.add_argument("--output", required=True, metavar="OUT", help="directory to write")
    parser.add_argument(
        "--to", choices=("gptforge", "hf"), default="gptforge", help="output format (default: gptforge)"
    )
    parser.add_argument("--overwrite", action="store_true", help="write into an existing non-empty OUT")
    args = parser.parse_args(argv)
    setup_logging()

    out = output_dir(args.output, args.overwrite)
    from gptforge.hf import save_hf
    from gptforge.weights import load_model, save_model_dir

    model, cfg, tok = load_model(args.checkpoint)
    if args.to == "hf":
        save_hf(model, cfg, out, tok.describe())
    else:
        save_model_dir(model, cfg, tok.describe(), out)
    log.info(
        "wrote %s (%s, %s parameters, vocabulary %d) from %s",
        out,
        "Hugging Face GPT-2" if args.to == "hf" else "gptforge consolidated model",
        f"{sum(p.numel() for p in model.parameters()):,}",
        cfg.vocab_size,
        describe_source(args.checkpoint),
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
