#!/usr/bin/env bash
# Downloads tokamax and Qwix (bench_qmatmul.py's third-party baselines, experiments/qmatmul_baselines.py) and the
# packages they need beyond the GPU image's jax / flax stack, as wheels for the device (Python 3.12, x86-64 Linux),
# into .wheels/ (git-ignored). The device has no network: pass `carry: [".wheels"]` to the device tool and install
# there with
#     bash experiments/install_baseline_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.wheels
mkdir -p "$dest"
target=(--python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --only-binary=:all:)
# the two libraries themselves (tokamax 0.0.17, written for jax 0.11 as on the device; it imports xprof, whose
# wheels with their dependencies pass the 64 MiB carry limit: baseline_stubs/xprof stands in), without jax / flax / numpy
pip download -q --no-deps "${target[@]}" -d "$dest" "tokamax==0.0.17" "qwix==0.1.8"
# their other requirements, each without dependencies that the image has (numpy, jax, flax)
pip download -q --no-deps "${target[@]}" -d "$dest" einshape jaxtyping wadler-lindig "typeguard==2.13.3" \
    immutabledict tensorboardx protobuf packaging tqdm opt_einsum absl-py
pip download -q "${target[@]}" -d "$dest" pydantic  # with pydantic-core of the matching version
du -sh "$dest"
ls "$dest"
