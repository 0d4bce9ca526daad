"""What becomes of the files users upload: read into memory, their temporary copies swept away.

Gradio writes every upload, and every file it serves, into its temp folder. The demo gives it a
private folder, deletes whatever there is older than a TTL every few seconds, and empties the
folder when the server stops. The folder is locked while its server lives, so a server that was
killed before it could clean up leaves an unlocked folder, which the next server removes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from ..core.imaging import ImageInputError, read_bytes
from .report import save_report

try:
    import fcntl
except ImportError:  # Windows has no flock: a killed server's folder is left to the system's temp cleanup
    fcntl = None

UPLOAD_TTL = 60.0  # seconds an uploaded file (or a served overlay) may stay in the upload folder
UPLOAD_TTL_ENV = "MURA_DEMO_UPLOAD_TTL"
PRIVATE_PREFIX = "mura-demo-uploads-"


def upload_folder() -> Path:
    """Where Gradio keeps uploads (the same rule as ``gradio.utils.get_upload_folder``)."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()


def read_upload(upload) -> bytes:
    """The bytes of an uploaded file (its temporary copy is swept away by :func:`sweep_uploads`)."""
    if upload is None:
        raise ImageInputError("No file was uploaded.")
    return read_bytes(Path(upload if isinstance(upload, str | os.PathLike) else upload.name))


def read_uploads(uploads) -> list[bytes]:
    """The bytes of one or several uploads; an unreadable one is named in the error."""
    if not uploads:
        raise ImageInputError("No files were uploaded.")
    data = []
    for upload in uploads if isinstance(uploads, list) else [uploads]:
        try:
            data.append(read_upload(upload))
        except ImageInputError as err:
            name = Path(upload if isinstance(upload, str | os.PathLike) else upload.name).name
            raise ImageInputError(f"{name}: {err}") from None
    return data


def report_file(page: Image.Image, kind: str) -> str:
    """Write a report page into its own folder under the (swept) upload folder, with a plain name."""
    folder = Path(tempfile.mkdtemp(dir=upload_folder(), prefix="report-"))
    return str(save_report(page, folder / f"mura-demo-report.{kind}"))


def png_file(rgb) -> str:
    """Write an overlay as PNG into the (swept) upload folder; fast zlib level, as Gradio's own
    PNG encoding (level 6) took a quarter of a request's server time."""
    folder = upload_folder()
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".png", delete=False) as fh:
        Image.fromarray(rgb).save(fh, format="PNG", compress_level=1)
    return fh.name


def sweep_uploads(folder: Path, max_age: float) -> int:
    """Delete files in ``folder`` older than ``max_age`` seconds, and the folders they leave empty
    (a younger empty folder stays: Gradio may be about to write into it); returns how many files.

    Gradio stores identical uploads at one path, so a file cannot be deleted the moment one
    request has read it (a concurrent request may still need it); it is deleted shortly after.
    """
    removed, now, old_folders = 0, time.time(), set()
    for parent, dirs, files in os.walk(folder, topdown=False):  # bottom-up; a folder gone mid-walk is skipped
        with contextlib.suppress(OSError):
            if now - os.stat(parent).st_mtime >= max_age:  # before its files go; a fresh one may be filling
                old_folders.add(parent)
        for path in (os.path.join(parent, name) for name in files):
            with contextlib.suppress(OSError):  # removed meanwhile by Gradio or another sweep
                if now - os.stat(path).st_mtime >= max_age:
                    os.unlink(path)
                    removed += 1
        for path in (os.path.join(parent, name) for name in dirs):
            if path in old_folders:
                with contextlib.suppress(OSError):  # not empty, or gone
                    os.rmdir(path)
    return removed


def run_every(seconds: float, task: Callable[[], object], name: str) -> threading.Thread:
    """Call ``task`` every ``seconds`` in a daemon thread, for the life of the server."""

    def loop():
        while True:
            time.sleep(seconds)
            try:
                task()
            except Exception:  # one failed round must not end the thread for the server's life
                logging.getLogger(__name__).exception("%s failed; trying again in %s s", name, seconds)

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread


def lock_folder(folder: Path) -> int | None:
    """An open descriptor holding an exclusive lock on ``folder``, or None if another process holds it."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def remove_abandoned_folders(base: Path) -> list[Path]:
    """Remove the private upload folders under ``base`` that no live server holds; returns them."""
    removed = []
    if fcntl is None:
        return removed
    for folder in base.glob(PRIVATE_PREFIX + "*"):
        with contextlib.suppress(OSError):
            fd = lock_folder(folder)
            if fd is not None:
                shutil.rmtree(folder, ignore_errors=True)
                os.close(fd)
                removed.append(folder)
    return removed


def new_private_folder(base: Path) -> tuple[Path, int | None]:
    """A new upload folder under ``base`` and the descriptor that locks it for this process's life.

    It is locked under a name other servers ignore, then renamed, so no server ever sees it unlocked.
    """
    staging = Path(tempfile.mkdtemp(dir=base, prefix="." + PRIVATE_PREFIX))
    fd = lock_folder(staging) if fcntl is not None else None
    folder = staging.with_name(staging.name[1:])
    staging.rename(folder)
    return folder, fd


@contextlib.contextmanager
def private_uploads(max_age: float):
    """For the life of the server: Gradio's uploads go to a private folder (unless ``GRADIO_TEMP_DIR``
    names one), which is swept of files older than ``max_age`` seconds and emptied at the end.
    Folders left behind by killed servers are removed first."""
    base = Path(tempfile.gettempdir())
    remove_abandoned_folders(base)
    folder, fd = None, None
    if not os.environ.get("GRADIO_TEMP_DIR"):
        folder, fd = new_private_folder(base)
        os.environ["GRADIO_TEMP_DIR"] = str(folder)
    uploads = upload_folder()
    run_every(max(1.0, max_age / 4), lambda: sweep_uploads(uploads, max_age), "upload-sweeper")
    try:
        yield uploads
    finally:
        if folder is None:
            sweep_uploads(uploads, 0)  # a folder named by GRADIO_TEMP_DIR stays; its files go
        else:
            shutil.rmtree(folder, ignore_errors=True)
            os.environ.pop("GRADIO_TEMP_DIR", None)
        if fd is not None:
            os.close(fd)
