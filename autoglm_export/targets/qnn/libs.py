"""Where ExecuTorch's Qualcomm backend gets its QNN libraries.

1. ``QNN_SDK_ROOT`` set: a real QNN SDK (2.37 matches the headers executorch 1.5.1 was built with).
2. Otherwise the QNN 2.51 libraries inside the pinned ``onnxruntime-qnn`` wheel (x86_64 HTP
   emulator + offline prepare), reached through ``qnn_htp_compat.c`` (beside this file):
   a forwarding ``libQnnHtp.so`` that converts the HTP device custom config from the 2.37 to the
   2.51 layout. ``make setup`` compiles it with the machine's gcc into ``$VIRTUAL_ENV/qnn_compat``.
   The libraries are found through ``LD_LIBRARY_PATH``, which the dynamic loader reads once at
   start-up, so QNN work runs in a subprocess with ``qnn_environment()``; and ONNX Runtime's QNN
   EP must not share that process (both would load a ``libQnnHtp.so``).

    python -m autoglm_export.targets.qnn.libs build   # what make setup runs
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from ...errors import BackendUnavailable

SHIM_SOURCE = Path(__file__).resolve().parent / "qnn_htp_compat.c"
REAL_LIBRARY_ENV = "AUTOGLM_QNN_HTP_LIBRARY"
FIX = (
    "either set QNN_SDK_ROOT to a QNN 2.37 SDK (Qualcomm AI Engine Direct), or `pip install onnxruntime-qnn==2.7.0` "
    "and run `make setup`, which builds the compatibility layer for its QNN 2.51 libraries"
)


def shim_path() -> Path:
    return Path(sys.prefix) / "qnn_compat" / "libQnnHtp.so"


def build_shim(dest: Path | None = None) -> Path:
    dest = dest or shim_path()
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise BackendUnavailable(
            "no C compiler to build the QNN compatibility layer", fix="install gcc, then run make setup"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".so.tmp")
    cmd = [
        gcc,
        "-shared",
        "-fPIC",
        "-O2",
        "-Wall",
        "-Werror",
        "-Wl,-soname,libQnnHtp.so",
        "-Wl,-z,nodelete",
        "-o",
        str(tmp),
        str(SHIM_SOURCE),
        "-ldl",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise BackendUnavailable(
            f"building {SHIM_SOURCE.name} failed: {proc.stderr.strip()[:200]}", fix="install gcc, then run make setup"
        )
    os.replace(tmp, dest)
    return dest


def wheel_library_dir() -> Path | None:
    try:
        import onnxruntime_qnn
    except ImportError:
        return None
    return Path(onnxruntime_qnn.get_qnn_htp_path()).parent


def qnn_environment() -> tuple[dict[str, str], dict]:
    """Environment for a subprocess that lowers or runs QNN ``.pte`` files, and a manifest note."""
    env = dict(os.environ)
    root = os.environ.get("QNN_SDK_ROOT")
    if root:
        libs = Path(root) / "lib" / "x86_64-linux-clang"
        if not (libs / "libQnnHtp.so").is_file():
            raise BackendUnavailable(
                "QNN_SDK_ROOT has no lib/x86_64-linux-clang/libQnnHtp.so", field="QNN_SDK_ROOT", got=root, fix=FIX
            )
        env["LD_LIBRARY_PATH"] = f"{libs}:{env.get('LD_LIBRARY_PATH', '')}"
        return env, {"source": "QNN SDK", "path": root, "compat_layer": False}
    wheel = wheel_library_dir()
    if wheel is None or not (wheel / "libQnnHtp.so").is_file():
        raise BackendUnavailable("no QNN libraries found", fix=FIX)
    shim = shim_path()
    if not shim.is_file():
        raise BackendUnavailable("the QNN compatibility layer is not built", file=shim, fix=FIX)
    env["QNN_SDK_ROOT"] = ""  # "set but empty": executorch must not try to download an SDK
    env["LD_LIBRARY_PATH"] = f"{shim.parent}:{wheel}:{env.get('LD_LIBRARY_PATH', '')}"
    env[REAL_LIBRARY_ENV] = str(wheel / "libQnnHtp.so")
    from onnxruntime_qnn.build_and_package_info import qnn_version

    return env, {
        "source": "onnxruntime-qnn wheel",
        "qnn_version": qnn_version,
        "path": str(wheel),
        "compat_layer": True,
        "compat_library": str(shim),
    }


if __name__ == "__main__":
    if sys.argv[1:] == ["build"]:
        try:
            print(f"built {build_shim()}")
        except BackendUnavailable as e:
            print(f"warning: {e} (the qnn target will be unavailable)", file=sys.stderr)
    else:
        print(__doc__)
