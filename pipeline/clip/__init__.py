"""CLIP behind two calls (`model`: load a folder or hub id, encode images and texts, embed a
vocabulary) and the geometry of segment crops (`crops`: best views, context boxes, antialiased
cutting, pooling per segment). Used by the embed stage and the teacher."""
