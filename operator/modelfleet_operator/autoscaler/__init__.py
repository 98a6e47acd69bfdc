"""QPS/p99 autoscaling for InferenceModels: a pure algorithm, metrics math, and metrics sources.

`algorithm` and `metrics` are pure (no clock, no I/O); `sources` does the HTTP. Import what you need from
the submodules; this package imports nothing heavy so the operator's start-up stays cheap.
"""
