"""Run Python code as if PyTorch and transformers were not installed:

    python tests/without_torch.py -c CODE
    python tests/without_torch.py -m MODULE [ARGS ...]
    python tests/without_torch.py SCRIPT [ARGS ...]

A None entry in sys.modules is how Python marks a module that cannot be imported: `import torch`
raises ImportError and importlib.util.find_spec("torch") answers None, as for an absent package.
"""

import runpy
import sys
from pathlib import Path

for name in ("torch", "transformers"):
    sys.modules[name] = None
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's gptjax

mode, *rest = sys.argv[1:]
if mode == "-c":
    sys.argv = ["-c", *rest[1:]]
    exec(compile(rest[0], "<without_torch>", "exec"), {"__name__": "__main__"})
elif mode == "-m":
    sys.argv = rest
    runpy.run_module(rest[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = [mode, *rest]
    runpy.run_path(mode, run_name="__main__")
