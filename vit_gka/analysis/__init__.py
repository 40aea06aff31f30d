"""Analysis of models and runs: FLOPs and parameters, attention statistics, benchmarks, sweep reports."""
