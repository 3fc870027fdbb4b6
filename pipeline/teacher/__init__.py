"""The offline teacher, the stand-in for CLIP: a small CLIP-architecture model fitted on its own
corpus of rooms (never the 3D store). `config` (TeacherConfig), `corpus` (build the corpus store),
`captions` (captions, colours, tokenizer), `crops` (captioned training crops), `fit` (the training
loop and `run_fit`), `evaluate` (crop accuracy), `folder` (the folder format and its corpus record)."""
