"""The paper's model, nothing else: config, the three encoders' modules, the LLM, the strict checkpoint
loader and the tokenizers. Imports nothing from the layers above (runtime, serving, launch, tools)."""
