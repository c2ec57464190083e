"""Geometry-aware LoRA optimisation: Riemannian preconditioning and AdaPreLoRA.

`linalg` holds the batched r x r math, `packing` the contiguous per-shape stacks it runs on,
`sketch` AdaPreLoRA's gradient statistics, `preconditioner` the optimizer hook and `coverage` the
pairing and the report of what is left out.
"""
