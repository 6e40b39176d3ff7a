"""Writing files so that a reader never sees half of one, shared by the models, training, the demo and the CLI.

Every writer goes through a temporary name in the destination's folder, then ``os.replace`` (one step on
POSIX and Windows): a crash at any moment leaves the old file (or none), never a truncated one.

- :func:`atomic_path`: a temporary file name for the caller to write; :func:`atomic_write`: an open file;
  :func:`atomic_folder`: a temporary folder renamed into place (a checkpoint); :func:`save_safetensors_atomic`.
- :func:`usual_mode`: what we write gets the mode a plain open()/mkdir gives (mkstemp and safetensors make 0600).
- :func:`sweep_temporaries`: a process killed outright (SIGKILL, power loss) cannot remove its temporary; the
  next writer of the folder removes those of our naming pattern (:func:`is_temporary`).

A temporary is named ``.<name>.<random>.tmp`` (``.<name>.<random>.tmp<suffix>`` for writers that pick the format
from the extension): hidden, next to its destination, and recognisable by the sweep.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile

__all__ = ["usual_mode", "atomic_path", "atomic_write", "atomic_folder", "save_safetensors_atomic", "is_temporary",
           "sweep_temporaries"]

_TEMP = ".tmp"
# '.' + the destination's name + '.' + mkstemp's random part + '.tmp' [+ an extension such as '.png']
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp(\.[A-Za-z0-9]+)?$")


def usual_mode(path, directory: bool = False) -> None:
    """mkstemp / mkdtemp create 0600 files and 0700 folders; what we write gets the mode a plain open() / mkdir
    would give it (0666 / 0777 minus the umask), so that others who may read the user's files can read ours."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


def _temp_parts(path) -> tuple[str, str]:
    path = os.fspath(path)
    return os.path.dirname(os.path.abspath(path)), "." + os.path.basename(path) + "."


@contextlib.contextmanager
def atomic_path(path, suffix: str = ""):
    """A temporary file name next to ``path`` (ending in ``.tmp`` + ``suffix``, for writers that go by the
    extension) for the caller to write; on success it gets the usual mode and replaces ``path`` in one step
    (``os.replace``), so a reader never sees a half-written file and a crash leaves the old one; on failure it is
    removed."""
    folder, prefix = _temp_parts(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=_TEMP + suffix)
    os.close(fd)
    try:
        yield tmp
        usual_mode(tmp)  # (after writing: some writers, safetensors' among them, make a new 0600 file)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", encoding: str | None = None):
    """Open a file for writing that replaces ``path`` in one step when the block ends (see :func:`atomic_path`);
    its contents are on disk (fsync) before the replace. ``encoding`` for text modes."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_folder(path):
    """A temporary folder next to ``path`` for the caller to fill; on success it (and every file in it) gets the
    usual mode and takes the place of ``path`` (an existing ``path`` is moved aside first and removed after, so
    at every moment either the old or the new folder is complete); on failure it is removed."""
    folder, prefix = _temp_parts(path)
    tmp = tempfile.mkdtemp(dir=folder, prefix=prefix, suffix=_TEMP)
    try:
        yield tmp
        usual_mode(tmp, directory=True)
        for name in os.listdir(tmp):  # (safetensors writes its files 0600)
            usual_mode(os.path.join(tmp, name))
        if os.path.exists(path):  # the same step saved again (e.g. Ctrl-C right after a periodic save)
            old = tmp + ".old"  # (a temporary's name too: a crash right here leaves it to the sweep)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_safetensors_atomic(model, path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_model`` (it de-duplicates tied weights) through :func:`atomic_path`."""
    from safetensors.torch import save_model

    with atomic_path(path) as tmp:
        save_model(model, tmp, metadata=metadata)


def is_temporary(name: str) -> bool:
    """Whether a file or folder name is one of our temporaries (see the module doc)."""
    return bool(_TEMP_NAME.match(name))


def sweep_temporaries(folder) -> list[str]:
    """Remove the temporaries a killed writer left in ``folder`` (not below it); returns their names. Only the
    folder's one writer may call this (another writer's temporary in progress would be removed too)."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            if not is_temporary(entry.name):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
            removed.append(entry.name)
    return sorted(removed)
