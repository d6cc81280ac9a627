"""Fine-tuning a pretrained GPT: sequence classification and instruction tuning, full or LoRA.

`gptforge.finetune.loop.finetune(cfg)` runs one (`launch/finetune.py` is its CLI). Modules: `config`
(the `finetune` config section), `data` (JSONL rows, examples, batches), `classify` (the classifier and
its metrics), `instruct` (prompt template, masked examples, responses), `lora` (adapters and merging),
`trainable` (what is frozen), `saved` (fine-tuned checkpoints back into models), `loop` (the run).
This package's import stays light: no DeepSpeed until a run starts.
"""
