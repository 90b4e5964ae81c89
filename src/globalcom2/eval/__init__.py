"""Evaluation on the paper's benchmarks: loaders, official metrics, a resumable, shardable runner.

* :mod:`globalcom2.eval.base`: the :class:`~globalcom2.eval.base.Benchmark` contract, the
  registry (:func:`~globalcom2.eval.base.get_benchmark`) and shared data readers.
* :mod:`globalcom2.eval.benchmarks`: one module per benchmark family.
"""

from .base import Benchmark, DataError, Sample, benchmark_names, get_benchmark, register_benchmark

__all__ = ["Benchmark", "DataError", "Sample", "benchmark_names", "get_benchmark", "register_benchmark"]
