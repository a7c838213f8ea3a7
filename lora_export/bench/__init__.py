"""`lora-export bench`: latency of base, merged, unmerged LoRA and adapter layers, in PyTorch and ONNX Runtime.

models: the variants and their inputs; runner: the timing method and statistics; baselines: AdapterH / AdapterL;
run: the verbs `bench` and `paper_table1`; package: `bench_package`.
"""

from .bench_model import bench, paper_table1
from .bench_package import bench_package
from .timing import BenchOptions, BenchResult

__all__ = ["BenchOptions", "BenchResult", "bench", "bench_package", "paper_table1"]
