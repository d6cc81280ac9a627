"""The corpus pipeline: raw text -> cleaned, filtered, deduplicated, tokenized shards (README, "Corpus
pipeline", fixes their format).

Entry point: `python data_pipeline/build.py --input PATH... --output DIR`; in Python,
`run_build(BuildOptions(inputs=[...], output=...))`.
"""

from data_pipeline.options import BuildOptions
from data_pipeline.pipeline import BuildResult, run_build

__all__ = ["BuildOptions", "BuildResult", "run_build"]
