"""MASS: per-task subspaces, the shared TSV-M model, the data-free router and two-pass inference.

Modules: `subspace` (truncated SVD, TSV-M over stored factors, redundancy filter),
`build` (writes an artifact), `config` (artifact layout and `mass_config.json`),
`task_store` (θ_Ω merges and their LRU cache), `router` (residuals and task selection),
`runtime` (`MassModel`), `evaluation` (text zoo accuracy, routing accuracy, latency),
`demo` (the `merge demo` comparison).
"""
