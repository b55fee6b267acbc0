#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what bench/gpu.sh installs on a GPU machine
# that has torch, CUDA and most packages but no package index: Python 3.12 wheels of the packages it
# lacks (or has in other versions), deepspeed's sdist, and ray's wheel repacked without its Java jar,
# dashboard client, RLlib, Serve and LLM parts, to stay under the 64 MiB that travels with a call.
# Run once, here, from the repository root: bash bench/gpu_wheels.sh (needs unzip, which keeps the
# executable bits of ray's binaries that python -m zipfile drops)
set -euo pipefail
PY=$(realpath -s "${PY:-.venv/bin/python}")  # absolute, the venv kept (no symlink resolved)
mkdir -p .whl
rm -f .whl/ray-stripped.tar.xz
get() {  # get FOLDER PACKAGE==VERSION...
  local dest=$1
  shift
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" "$@"
}
get .whl pydantic==2.14.4 pydantic_core==2.50.5 annotated-types typing-inspection hjson==3.1.0 \
  jsonschema==4.26.0 referencing==0.37.0 rpds-py jsonschema-specifications tensorboardX==2.6.5 \
  timm==1.0.31 transformers==5.24.0
"$PY" -m pip download -q --no-deps --no-binary=:all: -d .whl deepspeed==0.19.8
tmp=$(mktemp -d)
get "$tmp" ray==2.60.0
(cd "$tmp" && unzip -q ray-*.whl && rm -rf ray/jars ray/dashboard/client/build ray/rllib ray/serve ray/llm \
  && tar cJf ray-stripped.tar.xz ray ray-*.dist-info)
mv "$tmp/ray-stripped.tar.xz" .whl/ray-stripped.tar.xz
rm -rf "$tmp"
du -sh .whl
