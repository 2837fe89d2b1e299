# Source this on a lent GPU machine (bench/gpu.sh, bench/gpu_levers.sh) that lacks samdiffsr's dependencies:
#   source bench/device_setup.sh && BUDGET_S=420 bash bench/gpu.sh "$OUT/gpu.log"
# It installs the wheels of .whl/ (carried with the working tree; not in git: deepspeed, hjson, pydantic and
# pydantic-core, annotated-types, typing-inspection, typing-extensions, webdataset, braceexpand,
# segment-anything, pycocotools, submitit, zstandard) into /tmp/site, makes `python` the python3 that holds
# torch, and exports PATH and PYTHONPATH=/tmp/site:<this checkout> so that samdiffsr runs from the source tree
# without being installed (configs/ is found beside the package). Prints one check line; returns 1 on failure
# (never exits the calling shell). DEVICE_WHEELS / DEVICE_SITE override the wheel folder / install target.
_ds_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_ds_setup() {
  local py site=${DEVICE_SITE:-/tmp/site} whl=${DEVICE_WHEELS:-$_ds_repo/.whl}
  py=$(command -v python3) || { echo "device_setup: no python3" >&2; return 1; }
  if compgen -G "$whl/*.whl" >/dev/null; then
    PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$whl"/*.whl || { echo "device_setup: pip install of .whl/ failed" >&2; return 1; }
  else
    echo "device_setup: no wheels in $whl (carry .whl); using what is installed" >&2
  fi
  # A wrapper, not a symlink: a venv's python finds its pyvenv.cfg (and torch) beside the path it was run by.
  mkdir -p /tmp/bin && rm -f /tmp/bin/python && printf '#!/bin/sh\nexec %s "$@"\n' "$py" >/tmp/bin/python &&
    chmod +x /tmp/bin/python
  export PATH="$site/bin:/tmp/bin:$PATH"
  export PYTHONPATH="$site:$_ds_repo${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONUNBUFFERED=1
  python -c "import torch, deepspeed, webdataset, segment_anything, pycocotools, submitit, zstandard, samdiffsr
from samdiffsr.bundled import config_path
print('device_setup: python', __import__('sys').version.split()[0], '| torch', torch.__version__,
      '| deepspeed', deepspeed.__version__, '| webdataset', webdataset.__version__, '| samdiffsr from',
      samdiffsr.__file__, '| configs/demo.yaml ->', config_path('configs/demo.yaml'),
      '| cuda', torch.cuda.is_available(), torch.cuda.device_count())" 2>&1 | grep -v "real_accelerator"
  return "${PIPESTATUS[0]}"
}
_ds_setup
