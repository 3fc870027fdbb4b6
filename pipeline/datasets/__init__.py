"""Dataset readers: raw release files -> `RawScene`. Each module has `CLASS_NAMES`,
`list_scenes(raw_dir)`, `read_scene(raw_dir, scene_id, cfg=...)` and a reader config dataclass."""
from __future__ import annotations

import importlib
from types import ModuleType

_MODULES = {
    "scannet": ("pipeline.readers.scannet", "ScanNetReaderConfig"),
    "synthetic": ("pipeline.readers.scannet", "ScanNetReaderConfig"),  # synthetic rooms use the ScanNet layout
    "s3dis": ("pipeline.readers.s3dis", "S3DISReaderConfig"),
    "semantickitti": ("pipeline.readers.semantickitti", "SemanticKITTIReaderConfig"),
}
DATASETS = tuple(_MODULES)


def get_reader(dataset: str) -> tuple[ModuleType, type]:
    """(reader module, its config class) for a dataset name."""
    if dataset not in _MODULES:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    module_name, config_name = _MODULES[dataset]
    module = importlib.import_module(module_name)
    return module, getattr(module, config_name)
