"""circus's flapping plugin, fixed: a crash loop stops its watcher, for good.

Configured like the stock plugin; a watcher may override each option with
``flapping.attempts`` and so on::

    [circus]
    debug = True        # the only way circusd shows a plugin's output (see below)

    [plugin:flapping]
    use = circus_wsgi.flapping.Flapping
    attempts = 3        # this many crashes ...
    window = 5          # ... within this many seconds are a crash loop:
    retry_in = 10       # stop the watcher and start it again this much later,
    retries = 2         # this many times; then stop it for good (-1: never)
    run_dir = /srv/app/run   # optional: note each decision to the stack's dispatcher

What it fixes in circus 0.19's ``circus.plugins.flapping.Flapping``:

- Its ``max_retry`` is called ``retries`` here: circus also reads a plugin
  section's options as those of the watcher that runs the plugin, and to circus
  ``max_retry = 0`` means "never start it": the plugin never ran at all. (A
  watcher's own ``flapping.max_retry`` still overrides it.)

- Only crashes count (:func:`circus_wsgi.exits.is_crash`): recycling (exit 0),
  stops and reloads (SIGTERM) and the dispatcher's kills of stuck workers
  (:data:`~circus_wsgi.exits.STUCK_SIGNAL`) are planned. Exits caused by this
  plugin's own stop are not counted either.
- A watcher it gave up on stays stopped. The stock plugin casts its commands,
  and circusd silently drops a command that arrives while it runs another one
  ("arbiter is already running ... command"), so many of its stops never
  happen; and it never cancels a retry timer, so a timer from an earlier
  attempt starts the watcher again after it gave up, forever. Here commands
  are calls, repeated while circusd is busy, and a watcher has at most one
  pending retry, cancelled when it is replaced, on reset and on giving up.
  Retries run on the plugin's IO loop, not in threads sharing its zmq socket.
- ``reset()`` tests ``name in self.timers`` (the stock one tests ``is``).
- The window is plain: ``attempts`` crashes within ``window`` seconds. The
  stock one subtracts ``check_delay``, which a plugin always sees as 5 s
  (circusd never passes ``--check-delay`` to it). circusd respawns a crashed
  process at its next check, so a crash loop of N processes gives at most N
  crashes per ``check_delay``: keep ``window`` above
  ``attempts * check_delay / N``. Retries are granted afresh once a watcher
  runs a whole window without a crash.
- Its decisions are logged, and with ``run_dir`` noted to the dispatcher
  (:func:`circus_wsgi.status.send_note`), which keeps them for the console.
  circusd sends a plugin's stdout and stderr to
  /dev/null unless ``[circus] debug = True``, which streams them to circusd's
  stdout (and runs plugins at log level DEBUG); a ``[plugin:...]`` section
  cannot set a stream.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Any

from circus.plugins import flapping
from circus.util import to_bool

from circus_wsgi import exits
from circus_wsgi.lifeline import die_with_parent
from circus_wsgi.settings import Settings
from circus_wsgi.status import send_note

log = logging.getLogger(__name__)

#: How long to keep asking circusd to start or stop a watcher while it is busy.
COMMAND_DEADLINE = 5.0
#: How long a note of a decision may hold up the plugin (the dispatcher may be the
#: watcher it stopped).
NOTE_TIMEOUT = 0.25


class Flapping(flapping.Flapping):
    """Stop a watcher whose processes crash in a loop; see the module docstring."""

    def __init__(self, *args: Any, **config: Any) -> None:
        # circus runs plugins at DEBUG when circus.ini says debug = True, the only
        # setting that lets their output through (unless circus.ini gives the plugin's
        # command a level, as circus-wsgi's does); this plugin's decisions are INFO and
        # above, and the DEBUG lines (asyncio's among them) would only flood the log.
        root = logging.getLogger()
        root.setLevel(max(root.level, logging.INFO))
        super().__init__(*args, **config)
        if "retries" in config:
            self.max_retry = int(config["retries"])
        #: Watchers this plugin has stopped, until circusd reports them stopped.
        self.stopping: set[str] = set()
        #: Per watcher, the time of its last counted crash or retry.
        self.last_trouble: dict[str, float] = {}
        self.stack = Settings(run_dir=config["run_dir"]) if config.get("run_dir") else None

    def handle_init(self) -> None:
        die_with_parent()

    def handle_recv(self, data: list[bytes]) -> None:
        name, action, msg = self.split_data(data)
        if action == "reap":
            self.reaped(name, self.load_message(msg))
        elif action == "stop" and name not in self.stopping:
            self.reset(name)  # stopped by someone else: forget its crashes and retry
        elif action in ("stop", "start"):
            self.stopping.discard(name)
        elif action == "updated":
            self.update_conf(name)

    def reaped(self, name: str, event: dict[str, Any]) -> None:
        """Count a crash of one of the watcher's processes; stop a crash loop."""
        exit_code = event.get("exit_code")
        if name in self.stopping or exit_code is None or not exits.is_crash(exit_code):
            return
        conf = self.configs[name] if name in self.configs else self.update_conf(name)
        if not to_bool(self._get_conf(conf, "active")):
            return
        now = event.get("time") or time.time()
        window = self._get_conf(conf, "window")
        attempts = self._get_conf(conf, "attempts")
        if now - self.last_trouble.get(name, now) > window:
            self.tries[name] = 0
        self.last_trouble[name] = now
        crashes = [t for t in self.timelines.get(name, []) if t > now - window] + [now]
        self.timelines[name] = crashes
        log.warning("%s: crash counted: pid %s %s; %d of %d in %gs",
                 name, event.get("process_pid"), describe(exit_code), len(crashes),
                 attempts, window)
        if len(crashes) >= attempts:
            self.stop_crash_loop(name, conf)

    def stop_crash_loop(self, name: str, conf: dict[str, Any]) -> None:
        """Stop the watcher; start it again later unless it has had all its retries."""
        if not self.command("stop", name):
            return
        self.stopping.add(name)
        self.timelines[name] = []
        tries, max_retry = self.tries.get(name, 0), self._get_conf(conf, "max_retry")
        if tries < max_retry or max_retry == flapping.INFINITE_RETRY:
            retry_in = self._get_conf(conf, "retry_in")
            self.cancel_retry(name)
            self.timers[name] = self.loop.call_later(retry_in, self.retry, name)
            self.tries[name] = tries + 1
            of = "unlimited" if max_retry == flapping.INFINITE_RETRY else max_retry
            self.decided(logging.WARNING, name, "stop", "crash loop: watcher stopped; "
                         f"retry {tries + 1} of {of} in {retry_in:g}s")
        else:
            self.reset(name)
            self.decided(logging.ERROR, name, "give up", "crash loop: watcher stopped for "
                         f"good after {tries} retries; fix it, then `circusctl start {name}`")

    def retry(self, name: str) -> None:
        del self.timers[name]
        self.last_trouble[name] = time.time()
        self.decided(logging.WARNING, name, "retry", "retrying: starting the watcher")
        self.command("start", name)

    def decided(self, level: int, name: str, action: str, detail: str) -> None:
        """Log a decision about watcher ``name`` and note it to the dispatcher."""
        log.log(level, "%s: %s", name, detail)
        if self.stack is not None:
            send_note(self.stack, {"by": "flapping", "action": action, "reason": name,
                                   "detail": f"{name}: {detail}"}, timeout=NOTE_TIMEOUT)

    def command(self, command: str, name: str) -> bool:
        """Start or stop a watcher; circusd refuses while it runs another command."""
        deadline = time.monotonic() + COMMAND_DEADLINE
        while True:
            reply = self.call(command, name=name, match="simple")
            if reply.get("status") == "ok":
                return True
            if time.monotonic() > deadline:
                log.error("%s: circusd refused to %s it: %s", name, command, reply.get("reason"))
                return False
            time.sleep(0.05)

    def reset(self, name: str) -> None:
        self.timelines[name] = []
        self.tries[name] = 0
        self.cancel_retry(name)

    def cancel_retry(self, name: str) -> None:
        if name in self.timers:
            self.loop.remove_timeout(self.timers.pop(name))

    def handle_stop(self) -> None:
        for name in list(self.timers):
            self.cancel_retry(name)


def describe(exit_code: int) -> str:
    """``exit 1`` or ``killed by SIGKILL``, from circus's exit code."""
    if exit_code >= 0:
        return f"exit {exit_code}"
    try:
        return f"killed by {signal.Signals(-exit_code).name}"
    except ValueError:
        return f"killed by signal {-exit_code}"
