"""``--reload``: the watcher that reloads the workers when the application's files change.

With :setting:`reload`, circus.ini gets a watcher ``reloader`` running
``circus-wsgi reloader``, so it runs and dies with the stack, under serve and
under plain circusd alike. It watches, with watchfiles (a Rust watcher on the
kernel's inotify), the Python files under :setting:`chdir` and under the
packages of the application and its mounts, and each :setting:`reload_extra_files`
path: a directory with everything below it, a file through its directory (an
editor replaces a file rather than write it, which ends a watch on the file).

After a change it imports the application once in a child process, as serve
does before it starts: if that fails, it logs the error's last line and the
old workers go on serving. Otherwise it asks circusd for a graceful ``reload
workers``: new workers start and the old ones stop the way ``circusctl decr``
stops them (they take nothing new and finish what they hold); the dispatcher
keeps requests queued until a new worker is ready, so no request fails.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from circus.client import CircusClient
from circus.exc import CallError

from .appload import AppLoadError, prepare_path
from .exits import EXIT_USAGE
from .lifeline import die_with_parent
from .rundir import RunDir
from .settings import Settings, SettingsError

__all__ = ["check_available", "watched", "run_reloader"]

log = logging.getLogger("circus_wsgi.reloader")

#: Milliseconds without a new change before a burst of changes is acted on (an editor
#: or a checkout writes several files), and the longest a burst is gathered.
QUIET_MS, GATHER_MS = 50, 400
#: Milliseconds between the file watchers' wake-ups while nothing changes.
WAKE_MS = 250
#: Exit status when the file watcher stops (a crash: circus starts the reloader again).
EXIT_FAILED = 1
#: How long circusd may stay busy with another command before the reload is given up.
BUSY_FOR = 10.0


def check_available(settings: Settings) -> None:
    """With reload, the watchfiles package must be installed: SettingsError otherwise."""
    if settings.reload and importlib.util.find_spec("watchfiles") is None:
        raise SettingsError("reload", True, "needs the watchfiles package: "
                            "pip install 'circus-wsgi[reload]'")


def _package_dirs(settings: Settings) -> list[str]:
    """The directories of the packages the application and its mounts import from
    (found without importing them; sys.path must be the workers')."""
    found = []
    for spec in [settings.app, *(app for _, app in settings.mounts)]:
        top = spec.partition(":")[0].partition(".")[0]
        try:
            module = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            continue
        if module is not None and module.submodule_search_locations:
            found += [os.path.abspath(p) for p in module.submodule_search_locations]
    return found


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def watched(settings: Settings) -> tuple[list[str], list[str], Callable[[Any, str], bool]]:
    """What to watch: the directories watched with all below them, those watched alone
    (an extra file's: editors replace a file, so its directory is what is watched), and
    the filter of the changes that count."""
    from watchfiles import DefaultFilter

    code = [settings.chdir, *_package_dirs(settings)]
    extra = list(settings.reload_extra_files)
    trees: list[str] = []
    for path in sorted(set(code + [p for p in extra if os.path.isdir(p)]), key=len):
        if not any(_under(path, tree) for tree in trees):
            trees.append(path)
    parents = {os.path.dirname(path) for path in extra if not os.path.isdir(path)}
    alone = sorted(d for d in parents if not any(_under(d, tree) for tree in trees))
    ignored = DefaultFilter()

    def counts(change: Any, path: str) -> bool:
        if any(_under(path, p) for p in extra):
            return True
        return path.endswith(".py") and ignored(change, path) and \
            any(_under(path, directory) for directory in code)

    return trees, alone, counts


def _changes(trees: list[str], alone: list[str], counts: Callable[[Any, str], bool]
             ) -> Iterator[set[tuple[Any, str]]]:
    """The changes that count, a burst at a time, from one watcher per kind of directory;
    it ends if a watcher does (its error logged). It returns once every watcher watches:
    a change made after that is seen."""
    import watchfiles

    bursts: queue.SimpleQueue = queue.SimpleQueue()
    kinds = [(paths, recursive) for paths, recursive in ((trees, True), (alone, False))
             if paths]
    ready = [threading.Event() for _ in kinds]

    def watch(paths: list[str], recursive: bool, watching: threading.Event) -> None:
        try:  # watchfiles yields an empty set after each quiet WAKE_MS: the first, ready
            for changes in watchfiles.watch(*paths, watch_filter=counts, recursive=recursive,
                                            step=QUIET_MS, debounce=GATHER_MS,
                                            rust_timeout=WAKE_MS, yield_on_timeout=True,
                                            raise_interrupt=False):
                watching.set()
                if changes:
                    bursts.put(changes)
        except Exception:
            log.exception("watching %s failed", ", ".join(paths))
        finally:
            bursts.put(None)
            watching.set()

    for (paths, recursive), watching in zip(kinds, ready, strict=True):
        threading.Thread(target=watch, args=(paths, recursive, watching), daemon=True).start()
    for watching in ready:
        watching.wait()
    return _bursts(bursts)


def _bursts(bursts: queue.SimpleQueue) -> Iterator[set[tuple[Any, str]]]:
    while (changes := bursts.get()) is not None:
        yield changes


def _reload_workers(endpoint: str) -> None:
    """Ask circusd for a graceful reload of the workers (retried while it is busy)."""
    client = CircusClient(endpoint=endpoint, timeout=BUSY_FOR)
    message = {"command": "reload", "properties": {"name": "workers", "graceful": True,
                                                    "sequential": False, "waiting": False}}
    deadline = time.monotonic() + BUSY_FOR
    try:
        while True:
            reply = client.call(message)
            if "already running" not in reply.get("reason", "") or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.1)
    except CallError as error:
        reply = {"reason": str(error)}
    finally:
        client.stop()
    if reply.get("status") != "ok":
        log.error("circusd did not reload the workers: %s", reply.get("reason"))


def _names(changes: Iterable[tuple[Any, str]], roots: list[str]) -> str:
    paths = sorted({path for _, path in changes})
    shown = [next((os.path.relpath(p, r) for r in roots if _under(p, r)), p) for p in paths]
    return ", ".join(shown[:3]) + (f" and {len(shown) - 3} more" if len(shown) > 3 else "")


def run_reloader(settings: Settings) -> int:
    """Entry point of ``circus-wsgi reloader``: watch and reload until circus stops it."""
    logging.basicConfig(stream=sys.stderr, level=settings.log_level.upper(), force=True,
                        format="%(asctime)s [%(process)d] [%(levelname)s] %(message)s")
    die_with_parent()
    from .serve import ServeError, check_app  # serve's own import check

    try:
        check_available(settings)
        prepare_path(settings.chdir, settings.virtualenv)
        trees, alone, counts = watched(settings)
    except (SettingsError, AppLoadError) as error:
        print(f"circus-wsgi reloader: {error}", file=sys.stderr)
        return EXIT_USAGE
    endpoint = settings.endpoint or RunDir(Path(settings.run_dir)).circus_endpoint
    roots = trees + alone
    changed = _changes(trees, alone, counts)
    log.warning("reloader on (for development): watching %s", ", ".join(roots))
    for changes in changed:
        log.warning("%s changed: reloading the workers", _names(changes, roots))  # as uvicorn
        try:
            check_app(settings)
        except (ServeError, SettingsError) as error:
            log.error("not reloading, the workers go on with the old code: %s", error)
            continue
        _reload_workers(endpoint)
    log.error("the file watcher stopped: the reloader exits (circus starts it again)")
    return EXIT_FAILED
