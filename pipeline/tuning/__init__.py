"""Tuning with Optuna: the search space, the study and one trial; pipeline/stages/tune.py drives them."""
