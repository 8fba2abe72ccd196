# Source on a lent GPU machine (see experiments/natural32.sh): wheels carried in .whl/ (papermill and its
# kernel, torch-fidelity) and the FID Inception weights carried in .fidw/ (packed; unpacked once per machine).
if ! ls .whl/*.whl > /dev/null 2>&1 || [ ! -f .fidw/unpack.py ]; then
  echo "experiments/gpu_env.sh: .whl/ or .fidw/ is missing: they are git-ignored, so the device tool must carry them" \
       '(carry: [".whl", ".fidw"])' >&2
  return 1 2> /dev/null || exit 1
fi
set -e
if [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
if [ ! -f /tmp/incep24.safetensors ]; then python3 .fidw/unpack.py .fidw/inception24.pack /tmp/incep24.safetensors; fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 SCTLIB_INCEPTION_WEIGHTS=/tmp/incep24.safetensors PY=python3
export WORK=${WORK:-/tmp/sct-natural32}
set +e
