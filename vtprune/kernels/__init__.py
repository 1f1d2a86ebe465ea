"""Optional fused GPU kernels (Triton) behind the torch implementations; imported lazily, never required."""
