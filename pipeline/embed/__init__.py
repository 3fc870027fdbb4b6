"""The embed stage: CLIP embeddings of rendered views, over-segments and class vocabularies.
`core` (EmbedConfig and the pure per-scene embedding), `stage` (the store runner, the cross-scene
GPU path, the vocabulary, the model check)."""
