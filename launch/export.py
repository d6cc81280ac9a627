"""Export a model to a Hugging Face directory: GPT-2 (`GPT2LMHeadModel.from_pretrained` loads it), or for a
Llama-shaped model (rope + rmsnorm + swiglu, no biases) `LlamaForCausalLM`; `AutoModelForCausalLM` loads
either. Any other shape is refused before OUT is created.

    python launch/export.py --checkpoint runs/gpt2-124m --output exports/gpt2-124m

Writes config.json, model.safetensors (fp32), gptforge.json, and for the GPT-2 tokenizer vocab.json,
merges.txt and tokenizer_config.json (so `AutoTokenizer.from_pretrained(OUT)` works too).
"""

from __future__ import annotations

import argparse
import logging

from gptforge.cli import output_dir, run_cli, setup_logging
from gptforge.hf import architecture, save_hf
from gptforge.weights import load_model

log = logging.getLogger("export")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", required=True, metavar="DIR", help="run directory, checkpoint or model directory"
    )
    parser.add_argument("--output", required=True, metavar="OUT", help="directory to write")
    parser.add_argument("--overwrite", action="store_true", help="write into an existing non-empty OUT")
    args = parser.parse_args(argv)
    setup_logging()

    model, cfg, tok = load_model(args.checkpoint)
    architecture(cfg)  # refuses a shape neither GPT-2 nor Llama expresses, before anything is written
    out = output_dir(args.output, args.overwrite)
    save_hf(model, cfg, out, tok.describe())
    log.info(
        "wrote %s (%s parameters, tokenizer %s)",
        out,
        f"{sum(p.numel() for p in model.parameters()):,}",
        tok.name,
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
