"""The network and its weights: config, device ops (the one place the device matters), layers, rope, vision tower,
text decoder, top model, KV cache layout, weight loading, quantisation, tensor parallelism. Imports only itself."""
