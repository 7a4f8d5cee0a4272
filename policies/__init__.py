"""Everything about the networks being trained: loading, tiny offline models, critics, LoRA."""

from policies.load import default_dtype, load, load_tokenizer

__all__ = ["default_dtype", "load", "load_tokenizer"]
