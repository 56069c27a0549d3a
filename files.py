"""
Files on disk: written so that a crash never leaves half of one, fetched so that an offline machine
learns it at once, read so that a damaged one is one line naming it, and a run folder locked to one
writer. The lowest module: every script and model.py write through it.

    atomic_write("out/bench.json", json.dumps(rows))               # bytes or text
    atomic_write("out/ckpt.pt", lambda tmp: torch.save(ckpt, tmp))  # or a function that writes the temp path
"""

import json
import os
import shutil
import socket
import urllib.parse
import urllib.request


class WriteError(OSError):
    """A file that could not be written (a full disk, a quota, a vanished folder); the old one is whole."""


class DownloadError(RuntimeError):
    """A download that cannot happen (offline, host unreachable): the message names the local way."""


def atomic_write(path, data):
    """data (bytes, text, or a function writing the temp path it is given) to a temp file beside
    `path` (PATH.tmp.PID), fsync, then rename: a crash leaves the old file or the new one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch wraps some OSErrors as RuntimeError
        reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0]
        kept = "the previous file is untouched" if os.path.exists(path) else "it was not created"
        raise WriteError(
            f"could not write {path} ({reason}); {kept}: free space or choose another folder "
            "(a training run then continues with --init_from=resume)"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_folder(folder, fill):
    """A folder written whole: fill(tmp) writes a fresh temp folder beside `folder` (FOLDER.tmp.PID),
    which then takes its place, the old folder removed only after: a crash or a full disk leaves the old
    folder or the new one, never a part, and no file of the old one survives into the new. Returns
    fill's result."""
    tmp, old = f"{folder}.tmp.{os.getpid()}", f"{folder}.old.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        result = fill(tmp)
        if os.path.exists(folder):
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
        return result
    except (OSError, RuntimeError) as e:
        raise WriteError(_unwritten(folder, e)) from None
    except Exception as e:  # a library's own write error (safetensors' SafetensorError on a full disk)
        if type(e).__name__ != "SafetensorError":
            raise
        raise WriteError(_unwritten(folder, e)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unwritten(folder, e):
    reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0]
    kept = "the previous one is untouched" if os.path.exists(folder) else "nothing of it was left"
    return f"could not write {folder}/ ({type(e).__name__}: {reason}); {kept}: free space or choose another folder"


def file_sha256(path):
    """The SHA-256 of a file's bytes, in hex: what names the exact file a result describes."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def reachable(url, timeout=5.0):
    """Whether url's host takes a TCP connection within `timeout` seconds: one try, so an offline
    machine learns it at once instead of after a library's retries."""
    parts = urllib.parse.urlsplit(url)
    try:
        socket.create_connection(
            (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)), timeout
        ).close()
        return True
    except OSError:
        return False


def download(url, path, fix):
    """url -> path, atomically; DownloadError saying `fix` when the host cannot be reached or the
    transfer fails."""
    if not reachable(url):
        raise DownloadError(
            f"cannot reach {urllib.parse.urlsplit(url).hostname} to download {url} (offline?): {fix}"
        )
    print(f"downloading {url}")
    try:
        atomic_write(path, lambda tmp: urllib.request.urlretrieve(url, tmp))
    except OSError as e:
        raise DownloadError(f"downloading {url} failed ({e}): {fix}") from None


def lock_folder(folder, what):
    """An exclusive lock on folder/.lock, held while the returned file stays open (close it to
    release). The kernel drops it when the process dies, so a killed run leaves nothing stuck. A folder
    another process holds gets one line naming that process."""
    import fcntl

    path = os.path.join(folder, ".lock")
    if (
        path in _HELD
    ):  # this process's own, left by a run that ended in an exception: a process runs one at a time
        _HELD.pop(path).close()
    try:  # never through a link: the lock writes its holder into the file
        f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "a+")
    except OSError as e:
        raise WriteError(
            f"{path} cannot be the lock file ({'a link' if os.path.islink(path) else e.strerror}): remove it, "
            "or choose another folder"
        ) from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise WriteError(
            f"{folder} is in use by {holder}: wait for it to finish (or stop it), or choose another folder"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} ({what})")
    f.flush()
    _HELD[path] = f
    return f


_HELD = {}  # lock path -> its open file, for the locks this process holds


def read_json(path):
    """A JSON object from `path`; a file that is not one (cut short, not UTF-8, a list) is one line
    naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path} is not readable JSON ({type(e).__name__}: {str(e)[:80]}): restore or re-create it"
        ) from None
    if not isinstance(value, dict):
        raise ValueError(
            f"{path} holds a JSON {type(value).__name__}, not the object expected: restore or re-create it"
        )
    return value


def read_text(path):
    """A UTF-8 text file; one that is not UTF-8 is one line naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {e.start}: {e.reason}): convert it to UTF-8 first"
        ) from None
