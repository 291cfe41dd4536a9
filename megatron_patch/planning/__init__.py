"""Layout planning: what each rank of a (TP, PP, DP) layout holds, counted from the real model built on
the meta device (census), the bytes of weights, gradients and optimizer state megatron-core keeps for
it (state_memory), an activation estimate (activations), and which layouts fit (layouts)."""
