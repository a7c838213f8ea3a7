"""`lora-export bench`: latency of base, merged, unmerged LoRA and adapter layers, in PyTorch and ONNX Runtime.

models: the variants and their inputs; runner: the timing method and statistics; baselines: AdapterH / AdapterL;
run: the verbs `bench` and `paper_table1`; package: `bench_package`.
"""

from .package import bench_package
from .run import bench, paper_table1
from .runner import BenchOptions, BenchResult

__all__ = ["BenchOptions", "BenchResult", "bench", "bench_package", "paper_table1"]
