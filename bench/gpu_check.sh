#!/bin/sh
# The prepared GPU check (issue 12), run on a lent GPU machine from the repository root:
#   here:   make gpu-prep                 (gathers .device/: goldens, the ResNet-50 prototxt, wheels)
#   there:  sh bench/gpu_check.sh         (device run with carry [".device"]; results in $OUT)
# ../shared does not travel to the device machine, and its Python lacks lmdb and a new protobuf:
# both come from .device/. See bench/gpu_check.py for the steps.
set -u
if [ -d .device/whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .device/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
[ -e ../shared ] || ln -s "$PWD/.device/shared" ../shared || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
exec python3 -m bench.gpu_check --out "${OUT:-.}" "$@"
