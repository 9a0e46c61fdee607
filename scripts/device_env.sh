# Sourced by the scripts/device_*.sh calls, from the repository root: the environment of a
# lent GPU machine whose Python lacks ml_collections and tensorboardX (carried as wheels in
# .whl/, see results/perf.md), with this checkout importable, CIFAR-10 read from
# data/cifar10-jpeg.tar.gz when it was carried there (both git-ignored), and $OUT made.
OUT=${OUT:-/tmp/mpdnn_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import ml_collections" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
[ -f data/cifar10-jpeg.tar.gz ] && export MPDNN_CIFAR10=$PWD/data/cifar10-jpeg.tar.gz
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
