#!/usr/bin/env bash
# Build .devdata/ here (git-ignored through .git/info/exclude; the device calls carry it): the wheels the device
# image lacks (diffusers and importlib_metadata, at this venv's versions), the data sets (CIFAR-10 as a jpeg pack,
# 19.6 MB instead of 62: benchmarks/device/jpeg_pack.py) and the MiniLM embeddings of the CIFAR-10 captions that
# pretrain_source.sh trains and samples with, so the device needs neither the registry nor the MiniLM weights.
# Run from the repository root with the venv active and IMAGEN_TRANSFER_DATA set.
set -euo pipefail
D=.devdata
mkdir -p $D/cache .git/info
grep -qx '/.devdata/' .git/info/exclude 2>/dev/null || echo /.devdata/ >> .git/info/exclude
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d $D \
    "diffusers==$(python -c 'import diffusers; print(diffusers.__version__)')" \
    "importlib_metadata==$(python -c 'import importlib.metadata as m; print(m.version("importlib_metadata"))')"
cp "$IMAGEN_TRANSFER_DATA/pneumoniamnist.npz" $D/
[ -f $D/cifar10-jpg.pack ] || python benchmarks/device/jpeg_pack.py pack "$IMAGEN_TRANSFER_DATA/cifar10-jpg.zip" $D/cifar10-jpg.pack
IMAGEN_TRANSFER_CACHE=$PWD/$D/cache python - <<'PY'
from imagen_transfer.config import load_config
from imagen_transfer.text import EmbeddingCache, TextEncoderSpec, default_cache_dir, load_text_encoder

config = load_config("configs/cifar10-small.yaml")
classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
captions = [t.format(label=c) for t in config.data.captions for c in classes] + config.sample.prompts + [""]
spec = TextEncoderSpec.parse(config.model.text_encoder, config.model.max_text_length)
EmbeddingCache(load_text_encoder(spec), default_cache_dir())(captions)
print(f"{len(set(captions))} CIFAR-10 captions cached")
PY
du -sh $D; ls $D
