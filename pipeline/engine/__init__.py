"""The training engine: the recurrent models, the compiled train step, augmentation, batched
inference and checkpoints. It knows nothing of stages or run folders."""
