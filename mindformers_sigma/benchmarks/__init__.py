"""Benchmarks that ship with the package (``pangu-sigma bench ...``); every record carries the machine."""
