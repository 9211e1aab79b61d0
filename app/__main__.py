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
# The app's parent goes first even when PYTHONPATH names it already: `python app/` puts the app folder itself first,
# where `app` would be found as the module app/app.py instead of this package.
if str(_here.parent) in sys.path:
    sys.path.remove(str(_here.parent))
sys.path.insert(0, str(_here.parent))

# Before anything heavy (torch, OpenMP and Holoscan start threads when imported): stop cleanly on docker stop at any
# moment (segmap.signals), size the thread pools to the container's CPU quota and set the file-mode mask; the
# app.yaml values of threads/umask apply once the settings are read (segmap.run.start).
from segmap import signals  # noqa: E402

signals.install()
try:
    from segmap.resources import apply_threads, apply_umask  # noqa: E402
    from segmap.settings import setting  # noqa: E402

    apply_threads(os.environ.get(setting("threads").env))
    apply_umask(os.environ.get(setting("umask").env, setting("umask").default))
except Exception:  # a bad value is reported with one line once the settings are read and validated
    pass

# Quieter Holoscan by default; HOLOSCAN_LOG_LEVEL set by the user wins. Without an NVIDIA driver (a CPU-only run),
# Holoscan's only warnings are two lines saying that CUDA is unavailable: errors only then.
_gpu = Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia").exists()
os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "WARN" if _gpu else "ERROR")
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
