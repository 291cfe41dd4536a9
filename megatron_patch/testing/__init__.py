"""What tests, tools and benchmarks build offline and compare against; nothing on the training path imports it.

- tiny.py             tiny random Idefics2 configs (Mistral- or Llama-3-style text) and random weights.
- tokenizer_files.py  an Idefics2 tokenizer folder from the real Mistral sentencepiece file (mistral-common).
- parity.py           the Megatron Idefics2 and transformers' on one batch (any TP x PP), and their differences.
- attention_masks.py dense masks the model never builds (packed rows), as references for its segment plans.
"""
