"""File names that come from workflow JSON and node inputs stay inside the folder they are meant for.

A workflow is data from anywhere: a name such as ``../../.ssh/id_rsa`` or ``/etc/passwd`` in a node input must never
reach a file outside the models or output folder. Names are checked lexically (no '..' part, not absolute, no drive
or UNC prefix, on POSIX and Windows spellings alike), so a symlink a user placed inside a models folder keeps working.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import InvalidParameterError

__all__ = ["inside", "find_inside"]


def inside(folder, name, what: str = "file name") -> Path:
    """``folder / name``, refusing a `name` that is not a relative path inside `folder`. `what` names the input in
    the message (e.g. "lora_name", "filename")."""
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise InvalidParameterError(f"{what}={name!r}: expected a file name relative to {folder}, such as "
                                    "'my_lora.safetensors' or 'styles/my_lora.safetensors'")
    posix, windows = PurePosixPath(name.strip()), PureWindowsPath(name.strip())
    if posix.is_absolute() or windows.is_absolute() or windows.drive or windows.root or ".." in posix.parts \
            or ".." in windows.parts or not posix.parts:
        raise InvalidParameterError(f"{what}={name!r}: must be a relative path inside {folder} (no '..', not "
                                    "absolute)")
    if len(name) > 1024 or any(len(part.encode("utf-8", "surrogatepass")) > 255 for part in posix.parts):
        raise InvalidParameterError(f"{what}={name[:40]!r}...: a file name part is limited to 255 bytes and the name "
                                    "to 1024 characters (the operating system's limits)")
    return Path(folder) / posix


def find_inside(folders, name, what: str = "file name", hint: str = "") -> Path:
    """The first existing file ``folder / name`` among `folders` (in order), every candidate checked by `inside`
    before anything touches the disk. Raises naming the input, the folders searched and `hint` (what to do instead)
    when none has it."""
    folders = [Path(f) for f in folders]
    if not folders:
        raise InvalidParameterError(f"{what}={name!r}: no folder to look in{'; ' + hint if hint else ''}")
    candidates = [inside(folder, name, what) for folder in folders]
    for path in candidates:
        if path.is_file():
            return path
    raise InvalidParameterError(f"{what}={name!r}: no such file in {' or '.join(str(f) for f in folders)}"
                                + (f"; {hint}" if hint else ""))
