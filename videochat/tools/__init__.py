"""Offline tools: the one-process chat CLI and the demo checkpoint (with its tokenizer assets)."""
