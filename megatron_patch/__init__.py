"""megatron_patch: Idefics2 vision-language models on megatron-core."""
