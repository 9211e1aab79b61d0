"""Entry point for ``python -m app`` and for a MAP's ``python3 /opt/holoscan/app``.

The operators live beside the app: in the repository at ``../operators``, in a MAP at ``/opt/holoscan/app/operators``
(copied there by ``segmap package``, or by the staging step before ``monai-deploy package``, see
docs/monai-deploy-package.md). Both places are put on ``sys.path``.
"""

import os
import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
for _p in (_here, _here.parent):
    if (_p / "operators").is_dir() and str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
# The folder holding the app package goes first: Python put the app folder itself there, where `app` would name
# app/app.py instead of the package.
if str(_here.parent) in sys.path:
    sys.path.remove(str(_here.parent))
sys.path.insert(0, str(_here.parent))

# Quieter Holoscan by default; HOLOSCAN_LOG_LEVEL set by the user wins.
os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "WARN")
try:  # Holoscan recommends a 32 MB stack; raise the soft limit where the hard limit allows.
    import resource

    _soft, _hard = resource.getrlimit(resource.RLIMIT_STACK)
    _want = 32 * 1024 * 1024
    if _soft != resource.RLIM_INFINITY and _soft < _want and (_hard == resource.RLIM_INFINITY or _hard >= _want):
        resource.setrlimit(resource.RLIMIT_STACK, (_want, _hard))
except (ImportError, ValueError, OSError):
    pass

from importlib import import_module  # noqa: E402

sys.exit(import_module(f"{_here.name}.app").main())
