"""4/8-bit group-wise quantization: the packed format (pack.py), the fused dequantize-matmul
(linear.py) and decode attention over a packed KV cache (attention.py)."""
