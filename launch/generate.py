"""Generate text from a trained model or a Hugging Face GPT-2 directory.

    python launch/generate.py --checkpoint runs/tiny --prompt "ROMEO:" --max-new-tokens 100
    python launch/generate.py --hf path/to/gpt2 --prompt "Hello" --temperature 0 --json
    python launch/generate.py --checkpoint runs/alpaca --instruct --prompt "Name a color." --temperature 0

`--checkpoint` takes a run directory (its latest checkpoint), one checkpoint, or a model directory written
by `gptforge.weights.save_model_dir`. `<|endoftext|>` in the prompt is the end-of-text token, so
`--prompt "<|endoftext|>"` gives an unconditional sample as GPT-2 does. `--instruct` formats the prompt
(and `--input`) with the template an instruction-tuned checkpoint was trained with (`--template`: alpaca
or a YAML file, for other models) and prints the response only.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from gptforge.cli import run_cli, setup_logging
from gptforge.errors import GptforgeError
from gptforge.finetune.saved import instruction_template
from gptforge.generate import generate
from gptforge.weights import load_model

log = logging.getLogger("generate")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint", metavar="DIR", help="run directory, checkpoint or gptforge model directory"
    )
    source.add_argument(
        "--hf", metavar="DIR", help="Hugging Face GPT-2 directory (config.json + model.safetensors)"
    )
    parser.add_argument("--prompt", required=True, help="text to continue (with --instruct: the instruction)")
    parser.add_argument(
        "--instruct",
        action="store_true",
        help="wrap --prompt (and --input) in the instruction-tuning template: the fine-tuned checkpoint's, "
        "else --template",
    )
    parser.add_argument("--input", default="", help="with --instruct: the Alpaca 'input' field")
    parser.add_argument(
        "--template", default=None, help="with --instruct: alpaca or a template YAML file (default: alpaca)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--json", action="store_true", help='print {"prompt_tokens", "completion_tokens", "text"}'
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    setup_logging(logging.WARNING if args.json else logging.INFO)
    if not args.prompt:
        raise GptforgeError(
            '--prompt is empty: give some text, or --prompt "<|endoftext|>" for an unconditional sample'
        )
    if not args.instruct and (args.input or args.template):
        raise GptforgeError("--input and --template apply to --instruct prompts; add --instruct")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    spec = f"hf:{args.hf}" if args.hf else args.checkpoint
    model, cfg, tok = load_model(spec, device=device)
    if args.instruct:  # tokenized as in fine-tuning: the template's text, special tokens as plain text
        prompt = tok.encode(instruction_template(spec, args.template).format(args.prompt, args.input))
    else:
        prompt = tok.encode(args.prompt, allow_special=True)
    if len(prompt) > cfg.context_length:
        log.info("prompt of %d tokens cropped to the last %d (the context)", len(prompt), cfg.context_length)

    start = time.perf_counter()
    completion = generate(
        model,
        [prompt],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        eot_id=tok.eot_id,
    )[0]
    seconds = time.perf_counter() - start
    log.info(
        "%d tokens in %.2f s (%.1f tokens/s)", len(completion), seconds, len(completion) / max(seconds, 1e-9)
    )

    text = tok.decode(completion)
    if args.json:
        print(json.dumps({"prompt_tokens": prompt, "completion_tokens": completion, "text": text}))
    else:
        print(text if args.instruct else args.prompt + text)
    return 0


if __name__ == "__main__":
    run_cli(main)
