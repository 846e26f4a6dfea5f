"""Networks: models, losses, training targets and their decoding, augmentation, training and inference."""
