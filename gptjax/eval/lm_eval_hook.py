"""Makes `lm_eval --model gptjax` work: registers gptjax's model with lm-evaluation-harness the moment
the harness imports its own models (lm_eval.models), without importing either beforehand.

Installed beside the package as the top-level module gptjax_lm_eval_hook and run at every start
of the interpreter by gptjax-lm-eval.pth, so it stays tiny: one finder on sys.meta_path that
watches for a single module name. The harness has no entry points for models; this is its plugin.
"""

import sys
from importlib.abc import MetaPathFinder
from importlib.machinery import PathFinder

WATCHED = "lm_eval.models"
TARGET = "gptjax.eval.harness:GptjaxLM"


def _register() -> None:
    from lm_eval.api.registry import model_registry

    if "gptjax" not in model_registry:
        model_registry.register("gptjax", target=TARGET)  # resolved (and gptjax imported) on first use


class _Finder(MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != WATCHED:
            return None
        spec = PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
