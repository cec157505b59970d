"""light_training: the training framework of SegMamba (data I/O, preprocessing, loading, augmentation,
training, prediction, evaluation). Submodules are imported on demand so that ``import light_training`` stays
cheap and never fails because an optional dependency is missing."""
