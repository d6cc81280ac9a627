"""Build a tokenized corpus: `python data_pipeline/build.py --input PATH... --output DIR [options]`.

The command line only: options are parsed here and handed to `data_pipeline.pipeline.run_build`, which wires
the steps. Under `mpirun -n N` / `srun` the ranks share the work (see data_pipeline/distributed.py).
"""

from __future__ import annotations

import argparse

from data_pipeline.options import BuildOptions, default_memory_per_rank, default_workers, parse_dedup
from data_pipeline.pipeline import run_build
from data_pipeline.spill import parse_size
from gptforge.cli import run_cli, setup_logging

EPILOG = """\
inputs: .txt (one document per file; also .txt.gz, .txt.zst), .jsonl/.json (one document per line, text in
--text-field; also .gz, .zst), .parquet, hf:NAME_OR_PATH[:SPLIT] (a save_to_disk directory or a dataset in the
local Hugging Face cache; no network). Directories are searched recursively; globs are expanded; all inputs are
read in sorted path order. Document id: the record's "id" field, else "<input path>:<record index>".

output: DIR/manifest.json (written last), DIR/{train,val}-NNNNN.bin/.idx (Megatron MMIDIDX), DIR/removed.jsonl
(and DIR/tokenizer.model for a SentencePiece tokenizer). Re-running a finished build is a no-op; other options
need --overwrite; a killed build, run again, resumes from its finished stages. See README "Corpus pipeline".
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="data_pipeline/build.py",
        description="Clean, filter, deduplicate and tokenize text into Megatron-compatible token shards.",
        epilog=EPILOG,
        formatter_class=lambda prog: argparse.ArgumentDefaultsHelpFormatter(prog, max_help_position=32),
    )
    _input_args(p)
    _quality_args(p)
    _dedup_args(p)
    _output_args(p)
    return p.parse_args(argv)


def _input_args(p: argparse.ArgumentParser) -> None:
    """What to read and how to tokenize it."""
    p.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH",
        help="input files, directories, globs or hf:NAME[:SPLIT] (repeatable)",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="output directory")
    p.add_argument("--tokenizer", default="gpt2", help="gpt2 or sentencepiece:MODEL")
    p.add_argument("--text-field", default="text", help="text field of .jsonl/.json/.parquet/hf records")


def _dedup_args(p: argparse.ArgumentParser) -> None:
    """Exact and MinHash near deduplication."""
    p.add_argument("--dedup", default="exact,minhash", help="none, exact, minhash or exact,minhash")
    p.add_argument(
        "--minhash-threshold",
        type=float,
        default=0.8,
        help="near-duplicate Jaccard threshold over word n-gram shingles (sets LSH bands/rows)",
    )
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    p.add_argument("--ngram", type=int, default=5, help="words per MinHash shingle")


def _quality_args(p: argparse.ArgumentParser) -> None:
    """Cleaning and quality filters."""
    p.add_argument(
        "--filters",
        default="default",
        help="quality filters: default, none, or a YAML file overriding data_pipeline/filters_default.yaml",
    )
    p.add_argument(
        "--strip-gutenberg", action="store_true", help="remove Project Gutenberg licence headers and footers"
    )
    p.add_argument(
        "--utf8-errors",
        choices=("strict", "replace"),
        default="strict",
        help="invalid UTF-8: strict removes the document as decode_error, replace repairs it (U+FFFD)",
    )


def _output_args(p: argparse.ArgumentParser) -> None:
    """Splits, shards, resources, errors and the output directory."""
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.01,
        help="share of documents in val (by a hash of seed and id); with too few documents, the "
        "share of tokens at the end of the token stream",
    )
    p.add_argument(
        "--shard-tokens",
        type=int,
        default=100_000_000,
        help="about this many tokens per shard (a new one at the first document at or after each multiple)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="worker processes (scan) and threads (tokenize) per rank; default: the CPUs available "
        "divided by the MPI ranks on this node",
    )
    p.add_argument(
        "--memory-per-rank",
        type=parse_size,
        default=default_memory_per_rank(),
        metavar="SIZE",
        help="what a rank may hold (512M, 4G); past it, the dedup stages spill to --tmp-dir; default: half "
        "of this node's memory divided by the MPI ranks on it",
    )
    p.add_argument(
        "--tmp-dir",
        default=None,
        metavar="DIR",
        help="temporary files and spill (on a filesystem every rank sees); default: OUTPUT/.build",
    )
    p.add_argument(
        "--seed", type=int, default=1234, help="seed of the val split and the MinHash permutations"
    )
    p.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="a malformed record: fail with file:line, or skip it as parse_error",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an output built with other options (only the build's own files are removed)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars or summary table")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    setup_logging()
    opts = BuildOptions(
        inputs=args.input,
        output=args.output,
        tokenizer=args.tokenizer,
        text_field=args.text_field,
        dedup=parse_dedup(args.dedup),
        minhash_threshold=args.minhash_threshold,
        num_perm=args.num_perm,
        ngram=args.ngram,
        filters=args.filters,
        strip_gutenberg=args.strip_gutenberg,
        utf8_errors=args.utf8_errors,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        seed=args.seed,
        on_error=args.on_error,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        memory_per_rank=args.memory_per_rank,
        tmp_dir=args.tmp_dir,
    )
    run_build(opts)
    return 0


if __name__ == "__main__":
    run_cli(main)
