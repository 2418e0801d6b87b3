"""Where tritonserver comes from, and the environment its python-backend stubs need.

- on PATH (the NGC image `nvcr.io/nvidia/tritonserver:24.10-py3`): used as is, with its own backends;
- else the binary inside the `nvidia-pytriton` wheel (Triton 2.51.0). Its python backend needs a stub
  built for the running Python: we assemble a backend folder (libtriton_python.so, the utils module
  and the stub for this Python version) and point `--backend-directory` at it.
The Python stubs find this package through PYTHONPATH and the weights through $MINIGPT5_WEIGHTS.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from .contract import DEVICE_ENV, WEIGHTS_ENV


@dataclass
class TritonBinary:
    executable: Path
    backend_source: Path | None = None  # pytriton's backends/python (None: the binary's own backends)
    libraries: list[Path] = field(default_factory=list)


def find_tritonserver() -> TritonBinary:
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonBinary(Path(on_path))
    try:
        import pytriton
    except ImportError:
        raise RuntimeError(
            "tritonserver not found: not on PATH and nvidia-pytriton is not installed "
            "(pip install 'minigpt5-triton[server]')"
        ) from None
    root = Path(pytriton.__file__).resolve().parent
    libs = root.parent / "nvidia_pytriton.libs"
    return TritonBinary(
        root / "tritonserver" / "bin" / "tritonserver",
        root / "tritonserver" / "backends" / "python",
        [libs] if libs.is_dir() else [],
    )


def prepare_backend_dir(binary: TritonBinary, workdir: Path) -> Path | None:
    """A backend directory whose python backend has the stub of this Python (pytriton case only)."""
    if binary.backend_source is None:
        return None
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = binary.backend_source.parents[1] / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise RuntimeError(f"nvidia-pytriton has no python-backend stub for Python {version}")
    target = workdir / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    for source in (
        binary.backend_source / "libtriton_python.so",
        binary.backend_source / "triton_python_backend_utils.py",
        stub,
    ):
        link = target / source.name
        if not link.exists():
            link.symlink_to(source)
    return workdir / "backends"


def server_environment(binary: TritonBinary, weights: Path, device: str) -> dict:
    env = dict(os.environ)
    libs = [str(p) for p in binary.libraries] + [sysconfig.get_config_var("LIBDIR") or ""]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs + _split(env.get("LD_LIBRARY_PATH")) if p)
    # The stub embeds Python and takes its site-packages from the `python3` first on PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # Four stub processes share the CPU cores: idle OpenMP workers must sleep, not spin.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env[WEIGHTS_ENV] = str(weights)
    if device != "auto":
        env[DEVICE_ENV] = device
    return env


def check_installed() -> None:
    """The stubs run in the Python found first on PATH (this one) and ignore PYTHONPATH, so the
    package must be installed in it (`pip install -e .` or `pip install .[server]`)."""
    try:
        metadata.distribution("minigpt5-triton")
    except metadata.PackageNotFoundError:
        raise RuntimeError(
            f"minigpt5-triton is not installed in {sys.prefix}; the Triton python stubs could "
            f"not import it. Run `pip install -e '.[server]'` (or `make serve`)."
        ) from None


def _split(value: str | None) -> list[str]:
    return [p for p in (value or "").split(os.pathsep) if p]
