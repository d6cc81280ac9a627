"""Fine-tuning a pretrained GPT: sequence classification and instruction tuning, full or LoRA.

`gptforge.finetune.tasks.finetune(cfg)` runs one (`launch/finetune.py` is its CLI): the trainer
(`gptforge.train.loop.Trainer`) with a task of `tasks`. Modules: `config` (the `finetune` config section),
`data` (JSONL rows, examples, batches), `classify` (the classifier and its metrics), `instruct` (prompt
template, masked examples, responses), `lora` (adapters and merging), `trainable` (what is frozen), `saved`
(classifiers and prompt templates back from checkpoints), `tasks` (the classify and instruct tasks).
This package's import stays light: no DeepSpeed until a run starts.
"""
