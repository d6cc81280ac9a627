"""The decoder (GPT-2 by default, Llama-style by config) and its size arithmetic."""

from gptforge.model.gpt import GPT, Block, CausalSelfAttention, KVCache
from gptforge.model.loss import LMLoss, chunked_cross_entropy
from gptforge.model.size import count_parameters, flops_per_token, memory_report, state_bytes

__all__ = [
    "GPT",
    "Block",
    "CausalSelfAttention",
    "KVCache",
    "LMLoss",
    "chunked_cross_entropy",
    "count_parameters",
    "flops_per_token",
    "memory_report",
    "state_bytes",
]
