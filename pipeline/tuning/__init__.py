"""Tuning with Optuna: the search space, the study (storage, retries, status) and one trial (the
objective, the worker processes). The tune stage (pipeline/stages/tune.py) drives them; the study
report is drawn by the report stage."""
