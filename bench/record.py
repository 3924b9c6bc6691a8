"""The benchmark scripts' record writer: the package's, so every record carries the same machine fields."""

from mindformers_sigma.benchmarks.record import write_record

__all__ = ["write_record"]
