"""Kernels of the engine's forward pass. Each op has a plain-torch reference `name_ref` (the
CPU path, batched, no per-sequence Python loops); Triton launchers `name` join them in the
kernels issue. `ops.get_ops(backend)` hands the model one table of functions."""
