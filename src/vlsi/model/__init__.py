"""Models: what the data flows through. Loading a VLM checkpoint (``loading``), reaching its layers and hidden
states across families (``backbone``), the LoRA adapters (``lora``), the verbalizers that map intermediate
layers to the language head (``verbalizer``), writing a trained model back out as a checkpoint (``export``),
and the tiny randomly initialised VLMs the CPU tests and the tiny setting use (``tiny``, ``tiny_models``)."""
