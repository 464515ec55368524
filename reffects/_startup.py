"""A quiet TensorFlow start-up; `reffects/__init__.py` imports this module before anything else.

While its shared libraries load, TensorFlow's C++ code writes log lines straight to file
descriptor 2: "WARNING: All log messages before absl::InitializeLog() is called are written to
STDERR", oneDNN and CPU-feature notices, "Could not find cuda drivers", and on CUDA builds
plug-in registration errors such as "Unable to register cuDNN factory" and "computation placer
already registered". They are written before TensorFlow reads `TF_CPP_MIN_LOG_LEVEL`, so the
variable does not hide them, whatever its value.

So `TF_CPP_MIN_LOG_LEVEL` defaults to 2 here (TensorFlow's C++ info and warning lines hidden,
errors shown), and while it is 2 or more, TensorFlow is imported with file descriptor 2 pointed
at a temporary file: what native code writes there during the import is dropped, unless the
import fails, in which case it is written out before the error propagates. Python's own
`sys.stderr` stays on the terminal throughout. Set `TF_CPP_MIN_LOG_LEVEL=0` to see every line.
"""

import contextlib
import io
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def quiet_requested() -> bool:
    """Whether `TF_CPP_MIN_LOG_LEVEL` asks for TensorFlow's info and warning lines to be hidden."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0")) >= 2
    except ValueError:
        return False


def _writes_to_descriptor(stream, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return False


@contextlib.contextmanager
def native_stderr_hidden():
    """Drops what native code writes to file descriptor 2 inside the block.

    Does nothing unless `quiet_requested()`. Python's `sys.stderr` keeps writing to the real
    stderr; if the block raises, the dropped text is written out before the error propagates.
    """
    if not quiet_requested():
        yield
        return
    python_stderr = sys.stderr
    with contextlib.suppress(AttributeError, OSError, ValueError):
        python_stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 (a daemon, pythonw): nothing to hide
        yield
        return
    replacement = None
    if _writes_to_descriptor(python_stderr, 2):
        replacement = io.TextIOWrapper(
            io.FileIO(os.dup(saved), "w"),
            encoding=getattr(python_stderr, "encoding", None) or "utf-8",
            errors="backslashreplace",
            line_buffering=True,
        )
        sys.stderr = replacement
    hidden = tempfile.TemporaryFile()
    os.dup2(hidden.fileno(), 2)
    failed = True
    try:
        yield
        failed = False
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        if replacement is not None:
            sys.stderr = python_stderr
            replacement.close()
        if failed:
            hidden.seek(0)
            with contextlib.suppress(AttributeError, OSError, ValueError):
                sys.stderr.write(hidden.read().decode("utf-8", "replace"))
                sys.stderr.flush()
        hidden.close()


if "tensorflow" not in sys.modules:
    with native_stderr_hidden():
        import tensorflow  # noqa: F401
