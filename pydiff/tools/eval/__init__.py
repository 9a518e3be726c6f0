"""Evaluation of model packages: shapes alignment, digits accuracy, the guidance sweep. Plain
functions that return results and raise `ValueError` on bad input; `pydiff eval` is their CLI."""
