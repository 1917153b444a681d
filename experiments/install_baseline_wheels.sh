#!/usr/bin/env bash
# Installs the third-party baselines of bench_qmatmul.py (tokamax, Qwix) on the device from the wheels that
# fetch_baseline_wheels.sh put in .wheels/ (carried there: `carry: [".wheels"]`). Each wheel goes in without
# dependency resolution (on the GPU image `pip install --no-index --find-links .wheels tokamax` stops at "No matching
# distribution found for jax": pip did not count the image's jax as installed); the small pure-Python packages that the
# image already has (absl, protobuf, packaging, tqdm, opt_einsum, typing_extensions) are kept as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=(tokamax qwix einshape jaxtyping wadler_lindig typeguard immutabledict tensorboardx pydantic- pydantic_core
        annotated_types typing_inspection)
for pair in absl:absl_py google.protobuf:protobuf packaging:packaging tqdm:tqdm opt_einsum:opt_einsum \
            typing_extensions:typing_extensions; do
    python -c "import ${pair%%:*}" 2>/dev/null || wheels+=("${pair##*:}")
done
files=()
for w in "${wheels[@]}"; do
    files+=(.wheels/"$w"*.whl)
done
python -m pip install -q --no-deps "${files[@]}"
python -c "import sys; sys.path.insert(0, '.'); from experiments import qmatmul_baselines as b; print('baselines:', b.available())"
