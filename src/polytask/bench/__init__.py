"""Benchmarks on real data that reproduce published multi-task optimisation tables.

:mod:`polytask.bench.qm9`: the QM9 protocol of Navon et al. (ICML 2022) / Liu et al. (NeurIPS
2023) with any registered balancer (``polytask bench qm9``). Needs the optional ``qm9`` extra.
"""
