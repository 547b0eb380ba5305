"""Benchmarks of fleetbus against baselines measured in the same run.

``python -m bench`` runs every scenario, prints a table and can write the
figures as JSON (``--json PATH``). Each figure is the median over repetitions
with its p25–p75 spread; ratios to a baseline are computed repetition by
repetition, with the variants interleaved inside each repetition.
"""
