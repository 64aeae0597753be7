"""Ansible callback for the lab: after the recap, the tasks that took the most wall time."""

from __future__ import annotations

import time

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: tasktimes
type: aggregate
short_description: the slowest tasks of a run, for the e2e lab's logs
description: Prints the twenty tasks (and handlers) with the most wall time at the end of a run.
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "tasktimes"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self.times: dict[str, float] = {}
        self.current: str | None = None
        self.started = 0.0

    def _close(self) -> None:
        if self.current:
            self.times[self.current] = self.times.get(self.current, 0.0) + time.monotonic() - self.started
            self.current = None

    def _open(self, name: str) -> None:
        self._close()
        self.current, self.started = name, time.monotonic()

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._open(task.get_name())

    def v2_playbook_on_handler_task_start(self, task):
        self._open("handler: " + task.get_name())

    def v2_playbook_on_stats(self, stats):
        self._close()
        self._display.display("SLOWEST TASKS (wall time, all hosts together)")
        for name, seconds in sorted(self.times.items(), key=lambda kv: -kv[1])[:20]:
            self._display.display(f"{seconds:8.2f}s  {name}")
