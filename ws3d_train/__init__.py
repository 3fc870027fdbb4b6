"""ws3d's trainer and inference: sparse backends (`sparse`), the network (`network`), the data
path (`data`), training (`train`), inference (`infer`), the run folder (`run`), the viewer
(`viewer`), benchmarks (`bench`) and the demo (`demo`)."""
