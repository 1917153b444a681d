#!/usr/bin/env bash
# Installs the third-party baselines of bench_qmatmul.py (tokamax, Qwix) on the device from the wheels that
# fetch_baseline_wheels.sh put in .wheels/ (carried there: `carry: [".wheels"]`). Each wheel goes in without
# dependency resolution (on the GPU image `pip install --no-index --find-links .wheels tokamax` stops at "No matching
# distribution found for jax": pip did not count the image's jax as installed); a wheel of a small pure-Python
# package that the image already has (absl, protobuf, packaging, tqdm, opt_einsum, typing_extensions) is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
declare -A module=([absl_py]=absl [protobuf]=google.protobuf [packaging]=packaging [tqdm]=tqdm
                   [opt_einsum]=opt_einsum [typing_extensions]=typing_extensions)
files=()
for whl in .wheels/*.whl; do
    dist=$(basename "$whl" | cut -d- -f1)
    if [[ -n "${module[$dist]:-}" ]] && python -c "import ${module[$dist]}" 2>/dev/null; then
        continue
    fi
    files+=("$whl")
done
python -m pip install -q --no-deps "${files[@]}"
python -c "import sys; sys.path.insert(0, '.'); from experiments import qmatmul_baselines as b; print('baselines:', b.available())"
