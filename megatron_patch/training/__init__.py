"""Training on megatron-core: flags, the loop, the one loss, optimizer, freezing, checkpoints, metrics.

The entry point is `examples/idefics2/pretrain_megatron_idefics2.py`; each piece of the loop is a
small named function in one of these modules.
"""
