"""ws3d's trainer and inference: sparse backends (`sparse`), the network (`network`), the data
path (`data`), training (`train`), inference (`infer`), the run folder (`run`), the viewer
(`viewer`), benchmarks (`bench`) and the demo (`demo`).

``from ws3d_train import Model`` gives a trained run as a model on arrays
(:class:`ws3d_train.infer.model.Model`); it is imported on first use, so that importing any
submodule does not load torch for nothing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ws3d_train.infer.model import Model, Prediction

__all__ = ["Model", "Prediction"]


def __getattr__(name: str) -> Any:
    if name in ("Model", "Prediction"):
        from ws3d_train.infer import model

        return getattr(model, name)
    raise AttributeError(f"module 'ws3d_train' has no attribute {name!r}")
