import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))  # `import fixtures`

# Many tests compile the same tiny programs: share XLA executables through a persistent cache
# (also across xdist workers and the subprocesses tests start, which inherit these env vars).
_CACHE = os.path.join(os.environ.get("PYTEST_JAX_CACHE", "/tmp/mmret_jax_test_xla_cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
