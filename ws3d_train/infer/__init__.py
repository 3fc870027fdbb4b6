"""Inference on a trained run: predictions and queries (`predict`), metrics (`metrics`),
evaluation (`evaluate`), instances and boxes (`instances`), 2D fusion and the 2D-3D ensemble
(`fusion`), the ScanNet benchmark formats (`export`) and pictures of a run (`report`). Never
imports a training loop."""
