"""Put this directory first on ``PYTHONPATH`` and vLLM is not there, as on a machine without it
(the GPU image): ``importlib.util.find_spec("vllm")`` is None and ``import vllm`` raises
ModuleNotFoundError, in the process and in every child that inherits the path. The benchmark
tests use it to check that a run without vLLM keeps its other rows."""

import importlib.machinery

_find_spec = importlib.machinery.PathFinder.find_spec.__func__


def _find_spec_without_vllm(cls, name, path=None, target=None):
    if name == "vllm" or name.startswith("vllm."):
        return None
    return _find_spec(cls, name, path, target)


importlib.machinery.PathFinder.find_spec = classmethod(_find_spec_without_vllm)
