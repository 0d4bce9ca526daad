"""Training: data, augmentation, training, evaluation, metrics and the model card.
It imports the core, never serving."""
