#!/usr/bin/env bash
# Fetch, on a machine with a package registry, the wheels that a bare CUDA image (Python 3.12,
# its own torch) lacks for mtrank and the torch-rechub comparison, into .whl/ (git-ignored;
# ~56 MiB). gpu_check.sh installs them there with --no-index into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# the versions mtrank is tested with here
VERS=$($PY -c "import polars, pydantic, pydantic_core; print(polars.__version__, pydantic.__version__, pydantic_core.__version__)" 2>/dev/null || echo "2.1.0 2.14.4 2.50.5")
read -r POLARS PYDANTIC CORE <<<"$VERS"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" -d .whl \
  "polars==$POLARS" "polars-runtime-32==$POLARS" "pydantic==$PYDANTIC" "pydantic-core==$CORE" \
  annotated-types typing-inspection torch-rechub==0.9.0
ls -la .whl
