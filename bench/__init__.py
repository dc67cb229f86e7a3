"""Benchmarks that compare cogcore with its peers side by side (`cogcore bench ...`).

Each is also a script: ``python bench/bench_kernels.py``, ``python bench/bench_distill.py``.
Results go to ``bench/results/*.json`` with the machine they ran on.
"""
