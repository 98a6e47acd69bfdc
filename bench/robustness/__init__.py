"""The slow half of the fuzz and abuse suite: scenarios, raw HTTP probes and servers for bench_robustness."""
