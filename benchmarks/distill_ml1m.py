"""Distillation on MovieLens-1M: one row per loss mix of benchmarks/configs/distill_ml1m.yaml, through the
same screen-then-seeds procedure as ``distill_synth.py``.

    python benchmarks/distill_ml1m.py [--seeds 0 1 2] [--runs runs/bench_distill_ml1m]

Writes benchmarks/results/distill_ml1m.{md,json}.
"""

from distill_synth import main

if __name__ == "__main__":
    main(name="distill_ml1m", config="benchmarks/configs/distill_ml1m.yaml")
