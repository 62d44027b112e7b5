# Sourced by the device scripts: install the carried wheels (the device image lacks diffusers) and point the package
# at the carried data and caption-embedding cache (.devdata/), so nothing needs the registry or the MiniLM weights.
set -u
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .devdata/*.whl
export PYTHONPATH=/tmp/site:$PWD/src IMAGEN_TRANSFER_DATA=$PWD/.devdata IMAGEN_TRANSFER_CACHE=/tmp/itcache
mkdir -p /tmp/itcache && cp -r .devdata/cache/text /tmp/itcache/
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
