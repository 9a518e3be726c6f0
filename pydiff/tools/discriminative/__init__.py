"""Training, baselines, attacks and evaluations for `pydiff.discriminative` (issue 26)."""
