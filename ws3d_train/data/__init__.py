"""The trainer's data path: typed batches (`batch`), scenes of a store as voxelised, augmented
samples (`dataset`), and the labels a fine-tuning run may see (`labels`)."""
