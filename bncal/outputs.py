"""The output policy: every file bncal writes goes through here.

The contract, for each output of a run (``-o``, ``--report-json``, ``--plot``, ``--keep-failed``,
the demo's files, anything later):

* it is never, and never resolves to (symlink, hard link, ``..``), an input of the run: the
  model file, the file behind a ``file.py:factory`` or ``file.py:func`` spec, the weights, the
  data file and every file inside a data folder;
* an existing file is replaced only with ``force``; two outputs of one run never share a path;
* its directory exists and is writable, and its name is one the file system accepts: checked
  when the run is planned, before any work;
* it is written into a private temporary folder in the destination's directory and moved into
  place only when the whole run succeeds (:class:`OutputPlan`), or at once when no plan is active
  (:func:`atomic_output`). On an error, Ctrl-C, SIGTERM or SIGHUP (see :func:`terminate_on_sigterm`),
  and at any exit the interpreter sees, the temporary folder is removed: nothing the run was asked to write exists afterwards, except
  outputs marked ``keep_on_failure`` (``--keep-failed``'s documented name);
* it is created exclusively when it is moved into place: a hard link that fails if the name
  appeared meanwhile (another run with the same ``-o``), so without ``force`` no file is ever
  replaced, whenever the other writer started. A run's outputs are placed all or nothing: when
  one cannot be placed, those already placed are taken back (a replaced file is restored);
* files are created with the mode the umask gives (0666 & ~umask), as any other program's;
* an OS error while writing names the path and the reason.

Library functions that write (:func:`bncal.torch.loading.save_state_dict`, :func:`bncal.onnx.io.save_onnx`,
the plots) call :func:`atomic_output`; inside an active plan their files are staged with the
plan's other outputs, so the CLI's all-or-nothing promise covers them without new parameters.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import dataclasses
import errno
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from .errors import BncalError

__all__ = ["OutputPlan", "atomic_output", "write_bytes", "write_text", "staged_size", "Terminated",
           "terminate_on_sigterm", "os_error_text", "active_plan"]

_STAGING_PREFIX = ".bncal-"
_STAGING_SUFFIX = ".tmp"
_ACTIVE: contextvars.ContextVar[OutputPlan | None] = contextvars.ContextVar("bncal_output_plan", default=None)
_LIVE_STAGING: set[Path] = set()  # every staging folder not yet removed, for SIGTERM and exit


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM or SIGHUP (see :func:`terminate_on_sigterm`), so that
    cleanup runs; ``signal_name`` says which."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum
        self.signal_name = signal.Signals(signum).name


def os_error_text(exc: OSError) -> str:
    """The reason of an OS error in words: ``Permission denied``, ``File name too long``..."""
    if exc.errno is not None:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: equal after resolving symlinks and ``..``, or the same inode."""
    try:
        if a.resolve() == b.resolve():
            return True
    except (OSError, RuntimeError):
        pass
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _linked_folders(folder: Path) -> list[Path]:
    """``folder`` and every folder a symlink inside it leads to (the data reader follows them),
    resolved; each visited once, so a loop of links ends."""
    roots, seen = [folder.resolve()], set()
    for directory, subdirectories, _ in os.walk(folder, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen:
            subdirectories[:] = []
            continue
        seen.add(real)
        for name in subdirectories:
            linked = os.path.join(directory, name)
            if os.path.islink(linked):
                roots.append(Path(os.path.realpath(linked)))
    return roots


def _inside(path: Path, folder: Path, roots: list[Path]) -> Path | None:
    """The file of ``folder`` (searched recursively, symlinked folders followed) that ``path`` is
    or links to, if any.

    A path that resolves into the folder and exists is one of its files; a hard link from
    elsewhere is found by its inode (looked for only when the file has several links).
    ``roots``: :func:`_linked_folders` of ``folder``."""
    resolved, root = path.resolve(), folder.resolve()
    for linked in roots:
        if resolved == linked or linked in resolved.parents:
            return resolved
    try:
        stat = path.stat()
    except OSError:
        return None
    if stat.st_nlink > 1:
        for candidate in root.rglob("*"):
            with contextlib.suppress(OSError):
                other = candidate.stat()
                if (other.st_dev, other.st_ino) == (stat.st_dev, stat.st_ino):
                    return candidate
    return None


@dataclasses.dataclass
class _Staging:
    """One output's private temporary folder beside its destination."""

    path: Path
    folder: Path
    since: float = dataclasses.field(default_factory=time.time)

    @classmethod
    def create(cls, path: Path) -> "_Staging":
        parent = path.parent
        try:
            folder = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, suffix=_STAGING_SUFFIX, dir=parent))
        except OSError as exc:
            raise BncalError(f"cannot write to directory {parent} (for {path}): {os_error_text(exc)}") from exc
        _LIVE_STAGING.add(folder)
        staging = cls(path, folder)
        # Probe the final name itself, on the same file system: a name too long fails here.
        probe = staging.file
        try:
            probe.touch(exist_ok=False)
            probe.unlink()
        except OSError as exc:
            staging.remove()
            raise BncalError(f"cannot create {path}: {os_error_text(exc)}") from exc
        return staging

    @property
    def file(self) -> Path:
        return self.folder / self.path.name

    @property
    def written(self) -> bool:
        return self.file.exists()

    def place(self, *, force: bool, option: str = "output") -> list[tuple[Path, Path | None]]:
        """Put every file of the folder beside the destination (an ONNX file's ``.data`` too), each
        created exclusively unless ``force`` (then the file it replaces is kept in the folder until
        :meth:`remove`). Returns ``(placed file, kept previous file or None)`` pairs for
        :func:`_take_back`; on an error what this call placed is taken back first."""
        placed: list[tuple[Path, Path | None]] = []
        files = sorted((p for p in self.folder.iterdir() if p.is_file()), key=lambda p: p.name != self.path.name)
        try:
            for item in files:
                target = self.path.parent / item.name
                placed.append((target, _replace_keeping(item, target, self.folder) if force else _link_new(item, target)))
        except FileExistsError as exc:
            _take_back(placed)
            raise BncalError(f"{option} {target} {_appeared(target, self.since)}; nothing was written: pass --force "
                             "to replace it, or give another path") from exc
        except OSError as exc:
            _take_back(placed)
            raise BncalError(f"cannot write {target}: {os_error_text(exc)}") from exc
        return placed

    def commit(self, *, force: bool = True) -> None:
        """:meth:`place` and remove the folder (also on failure)."""
        try:
            self.place(force=force)
        finally:
            self.remove()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        _LIVE_STAGING.discard(self.folder)


@dataclasses.dataclass
class _Planned:
    path: Path
    option: str
    keep_on_failure: bool = False
    staging: _Staging | None = None
    checked: bool = False


def _link_new(source: Path, target: Path) -> None:
    """Create ``target`` as ``source``'s content, failing with FileExistsError if it exists (a
    hard link; where the file system has none, an exclusive create that the rename then fills)."""
    try:
        os.link(source, target)
        return None
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
    os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    try:
        os.replace(source, target)
    except OSError:
        target.unlink(missing_ok=True)
        raise
    return None


def _replace_keeping(source: Path, target: Path, folder: Path) -> Path | None:
    """Replace ``target`` with ``source`` atomically; the file replaced (if any) is kept, as a
    hard link in ``folder/previous``, so that :func:`_take_back` can restore it."""
    previous = None
    if target.exists() or target.is_symlink():
        previous = folder / "previous" / target.name
        previous.parent.mkdir(exist_ok=True)
        try:
            os.link(target, previous, follow_symlinks=False)
        except OSError:
            shutil.copy2(target, previous, follow_symlinks=False)
    os.replace(source, target)
    return previous


def _take_back(placed: list[tuple[Path, Path | None]]) -> None:
    """Undo placed outputs, last first: restore the file each replaced, or remove it."""
    for target, previous in reversed(placed):
        with contextlib.suppress(OSError):
            if previous is not None:
                os.replace(previous, target)
            else:
                target.unlink()


def _appeared(target: Path, since: float) -> str:
    """Who wrote ``target`` (found in place when this run, staging since ``since``, placed its
    own), as far as the file says."""
    try:
        stat = target.stat(follow_symlinks=False)
    except OSError:
        return "was created by another process (a second run with the same output?) while this run worked"
    # ctime: when the name was linked to the file (a writer's rename or link changes it; its mtime may be older)
    when = time.strftime("%H:%M:%S", time.localtime(stat.st_ctime))
    if stat.st_ctime < since:  # a file beside the output (an ONNX .data file) that was there before
        return f"already exists (since {when}, before this run)"
    owner = ""
    if stat.st_uid != os.getuid():
        try:
            import pwd

            owner = f" of user {pwd.getpwuid(stat.st_uid).pw_name}"
        except (ImportError, KeyError):
            owner = f" of user id {stat.st_uid}"
    return f"was created at {when} by another process{owner} (a second run with the same output?) while this run worked"


class OutputPlan:
    """All the outputs of one run, checked before any work and written all together at its end.

    Usage::

        plan = OutputPlan(force=False)
        plan.protect(["model.onnx", "data.npy"])     # the run's input files
        plan.add("out.onnx", "-o")                    # every output, named by its option
        plan.check()                                  # BncalError on the first problem
        with plan:                                    # writes inside are staged
            save_onnx(model, "out.onnx")
        # success: every staged file is in place; an exception: none is (but keep_on_failure ones)

    ``add`` for a directory-to-create (the demo's ``--out``) is :meth:`add_directory`; it is
    removed again on failure if the run created it and left it empty.

    ``hold_staging=False`` (the ranks of a torchrun launch that do not write) checks every output
    as usual but removes each staging folder at once, so that a process killed without warning
    (SIGKILL, which no cleanup can observe) leaves nothing beside the outputs.
    """

    def __init__(self, *, force: bool = False, hold_staging: bool = True):
        self.force = force
        self.hold_staging = hold_staging
        self.inputs: list[Path] = []
        self._folder_roots: dict[Path, list[Path]] = {}
        self.outputs: list[_Planned] = []
        self.directories: list[Path] = []
        self._created: list[Path] = []
        self._checked = False
        self._token = None

    # planning -------------------------------------------------------------------------------
    def protect(self, files) -> None:
        """Add input files, or folders whose every file is an input: no output may be, or resolve to, one."""
        self.inputs.extend(Path(f) for f in files if f is not None)

    def _input_conflict(self, path: Path) -> Path | None:
        """The input ``path`` would overwrite, if any."""
        for item in self.inputs:
            if item.is_dir():
                if not (path.exists() or path.is_symlink()):
                    continue  # a new file is inside no folder
                if item not in self._folder_roots:  # walked once per run, however many outputs
                    self._folder_roots[item] = _linked_folders(item)
                inside = _inside(path, item, self._folder_roots[item])
                if inside is not None:
                    return inside
            elif _same_file(path, item):
                return item
        return None

    def add(self, path, option: str, *, keep_on_failure: bool = False) -> Path:
        """Plan an output named by ``option`` (for messages); checked by :meth:`check`."""
        planned = _Planned(Path(path), option, keep_on_failure)
        self.outputs.append(planned)
        if self._checked:
            self._check_one(planned)
        return planned.path

    def add_directory(self, path) -> Path:
        """A folder outputs go into, created by :meth:`check` when missing."""
        self.directories.append(Path(path))
        return Path(path)

    def check(self) -> None:
        """Check every planned output against the contract; create their staging folders."""
        try:
            for directory in self.directories:
                self._make_directory(directory)
            for planned in self.outputs:
                self._check_one(planned)
        except BaseException:
            self.discard()
            raise
        self._checked = True

    def _make_directory(self, directory: Path) -> None:
        if directory.exists() and not directory.is_dir():
            raise BncalError(f"{directory} exists and is not a directory; give a folder for the outputs")
        missing = [p for p in [directory, *directory.parents] if not p.exists()]
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BncalError(f"cannot create directory {directory}: {os_error_text(exc)}") from exc
        self._created.extend(missing)  # deepest first: removed in this order when left empty

    def _check_one(self, planned: _Planned) -> None:
        try:
            self._check_path(planned)
        except OSError as exc:  # a name too long, a loop of symlinks...
            raise BncalError(f"{planned.option} {planned.path}: {os_error_text(exc)}") from exc
        planned.staging = _Staging.create(planned.path)
        planned.checked = True
        if not self.hold_staging:
            planned.staging.remove()
            planned.staging = None

    def _check_path(self, planned: _Planned) -> None:
        path, option = planned.path, planned.option
        item = self._input_conflict(path)
        if item is not None:
            same = "" if path == item else f" ({item})"
            raise BncalError(f"{option} {path} is also an input of this run{same}; write to another "
                             "path (inputs are never overwritten)")
        for other in self.outputs:
            if other is not planned and other.checked and _same_file(path, other.path):
                raise BncalError(f"{option} {path} is also the path of {other.option}; give each output its own path")
        if path.is_dir():
            raise BncalError(f"{option} {path} is a directory; give a file path")
        if (path.exists() or path.is_symlink()) and not self.force:
            raise BncalError(f"{option} {path} already exists; pass --force to replace it")
        if not path.parent.is_dir():
            raise BncalError(f"the directory of {option} {path} does not exist; create {path.parent} first")

    def _find(self, path: Path) -> _Planned | None:
        return next((p for p in self.outputs if p.path == path or _same_file(p.path, path)), None)

    # running --------------------------------------------------------------------------------
    def staged_file(self, path) -> Path:
        """Where a write to ``path`` goes during the run (an unplanned path is checked now)."""
        path = Path(path)
        planned = self._find(path)
        if planned is None:
            planned = _Planned(path, "output")
            self.outputs.append(planned)
            self._check_one(planned)
        if planned.staging is None:
            planned.staging = _Staging.create(path)
        return planned.staging.file

    def __enter__(self) -> "OutputPlan":
        if not self._checked:
            self.check()
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        _ACTIVE.reset(self._token)
        if exc_type is None:
            self.commit()
        else:
            self.discard()

    def commit(self) -> list[Path]:
        """Move every written output into place, all or nothing; returns their paths.

        Without ``force`` each is created exclusively (an output that appeared during the run,
        written by another process, is not replaced); if one cannot be placed, those placed
        before it are taken back, and BncalError says which and why."""
        written, placed = [], []
        folders = [planned.staging.folder for planned in self.outputs if planned.staging is not None]
        try:
            for planned in self.outputs:
                if planned.staging is not None and planned.staging.written:
                    placed += planned.staging.place(force=self.force, option=planned.option)
                    written.append(planned.path)
        except BncalError as exc:
            _take_back(placed)
            self.discard()
            left = [folder for folder in folders if folder.exists()]
            if left:  # a directory made read-only during the run keeps even the empty folder
                raise BncalError(f"{exc}; the temporary folder {left[0]} could not be removed either (its directory is "
                                 "not writable now): remove it by hand") from exc
            raise
        except BaseException:
            _take_back(placed)
            raise
        finally:
            self.discard()
        return written

    def discard(self) -> None:
        """Remove every staging folder (committing the ``keep_on_failure`` outputs first)."""
        for planned in self.outputs:
            if planned.staging is None:
                continue
            if planned.keep_on_failure and planned.staging.written:
                with contextlib.suppress(BncalError):
                    planned.staging.place(force=self.force, option=planned.option)
            planned.staging.remove()
        for directory in self._created:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only when empty
        self._created = []


def active_plan() -> OutputPlan | None:
    return _ACTIVE.get()


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path to write ``path``'s content to.

    Inside an active :class:`OutputPlan` the file is staged and moved into place when the plan
    succeeds; otherwise it is moved into place when the block ends without error. On error the
    temporary file is removed and ``path`` is left as it was. An ``OSError`` raised while
    writing becomes a BncalError naming ``path`` and the reason.
    """
    path = Path(path)
    plan = _ACTIVE.get()
    staging = None if plan is not None else _Staging.create(path)
    target = plan.staged_file(path) if plan is not None else staging.file
    try:
        try:
            yield target
        except OSError as exc:
            raise BncalError(f"cannot write {path}: {os_error_text(exc)}") from exc
        if staging is not None:
            staging.commit()
    except BaseException:
        if plan is not None:
            with contextlib.suppress(OSError):
                target.unlink()
        raise
    finally:
        if staging is not None:
            staging.remove()


def write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_output`."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_output`."""
    return write_bytes(path, text.encode("utf-8"))


def staged_size(path) -> int:
    """Size in bytes of what was written to ``path`` in this run (staged or in place)."""
    plan = _ACTIVE.get()
    planned = plan._find(Path(path)) if plan is not None else None
    if planned is not None and planned.staging is not None and planned.staging.written:
        return planned.staging.file.stat().st_size
    return Path(path).stat().st_size


def _remove_live_staging() -> None:
    for folder in list(_LIVE_STAGING):
        shutil.rmtree(folder, ignore_errors=True)
        _LIVE_STAGING.discard(folder)


atexit.register(_remove_live_staging)  # any exit the interpreter runs its exit handlers for


@contextlib.contextmanager
def terminate_on_sigterm():
    """Turn SIGTERM (and SIGHUP) into :class:`Terminated` in the main thread while the block runs, so that
    every ``finally`` (and the staging cleanup) runs as it does for Ctrl-C. A process-level
    setting: the CLI uses it; library callers decide for themselves."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    caught = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])  # SIGHUP: the terminal closed
    previous = {signum: signal.signal(signum, handler) for signum in caught}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
        _remove_live_staging()
