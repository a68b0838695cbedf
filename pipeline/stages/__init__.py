"""The stages, one module each: download -> prepare -> folds -> train -> predict, then distill, blend,
tune, report, runs and upload. A stage imports the lower layers (engine, store, kaggle, config), never
another stage: the command line (pipeline/cli.py) wires them together."""
