"""The model: LLaMA pipeline stages and where their weights come from and go.

* ``presets`` — a model's shape (``ModelConfig``), the named presets, closed-form parameter counts (torch-free)
* ``llama`` — the stages, built from Hugging Face ``transformers`` Llama blocks
* ``init_from`` — start a run from a ``LlamaForCausalLM`` directory or another run's model
* ``hf_export`` — the trained model as a Hugging Face directory that loads with no code of ours
* ``hub`` — whether a hub tokenizer can be had, decided before a run starts
"""
