"""A stand-in for xprof, only so that tokamax imports where xprof is not installed (the device image; see
``experiments/qmatmul_baselines.py``). tokamax imports xprof's kernel-stats tool for its own benchmarking helpers,
which this project's benches do not call; anything that does call it gets an error that says so."""
