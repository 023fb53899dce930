"""Where extensions built on first use live (the fused stats kernel, the C++ recorder, the CPU stats
library, echo_npu): ``$TENSORDIFF_CACHE``, else ``~/.cache/tensordiff``."""
from __future__ import annotations

import os
from pathlib import Path


def build_cache() -> Path:
    return Path(os.environ.get("TENSORDIFF_CACHE", Path.home() / ".cache" / "tensordiff"))
