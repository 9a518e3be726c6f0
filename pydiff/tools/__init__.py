"""The tools tier: training, export, evaluation and benchmarks (the `[train]` / `[dev]` extras).

Nothing below this tier imports it: `import pydiff`, `pydiff.generate` and `pydiff serve` run
without torch. The command line (`pydiff train|export|eval|guidance|bench`) loads it on demand.
"""
