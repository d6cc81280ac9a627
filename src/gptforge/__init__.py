"""gptforge: pretrain GPT language models, from raw text to a checkpoint that survives preemption."""

__version__ = "0.1.0"
