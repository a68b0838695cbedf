"""The models, the train step, augmentation, inference and checkpoints; no stages, no run folders."""
