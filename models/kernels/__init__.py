"""Hand-written TVM TIR kernels for quantized models: 4-bit (Q4_1) / 8-bit (Q8_0) matmuls kept packed in
memory (VNNI, portable and CUDA variants), the Relax building blocks that use them, and faster CPU kernels
for the rest of a decode step (attention over the paged KV cache, RoPE, RMSNorm, SiLU·mul).
See docs/kernels.md. Importing this package imports nothing heavy; the modules import TVM."""
