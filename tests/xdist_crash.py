"""`--dist loadscope` that survives a crashed worker (pytest-xdist 3.8.0 hangs instead).

When a worker dies mid-test (an abort inside XLA, say), xdist's LoadScopeScheduling puts every
work unit the worker ever had back on the queue, completed ones included, and starts the test
that crashed again. A completed unit reaches the replacement worker as an empty batch, which it
waits on forever, and a replacement given a single one-test unit waits for a second test that
never comes (pytest-xdist issues 1323, 1327, 1363): CI then runs into its time limit instead of
reporting one failed test. This scheduler, installed by `tests/conftest.py` through xdist's
`pytest_xdist_make_scheduler` hook, counts the crashed test as done (xdist has already reported
it as failed), puts back only the units with tests still to run, and keeps at least two tests
queued on a worker until the queue is empty."""

from __future__ import annotations

from xdist.scheduler import LoadScopeScheduling


class CrashSafeLoadScope(LoadScopeScheduling):
    def remove_node(self, node):
        workload = self.assigned_work.pop(node)
        pending = [(scope, unit) for scope, unit in workload.items() if not all(unit.values())]
        if not pending:
            return None
        crashed = next(nodeid for _, unit in pending for nodeid, done in unit.items() if not done)
        pending[0][1][crashed] = True  # reported failed by xdist; not run again
        for scope, unit in reversed(pending):
            if not all(unit.values()):
                self.workqueue[scope] = unit
                self.workqueue.move_to_end(scope, last=False)  # next to be assigned
        for other in self.assigned_work:
            self._reschedule(other)
        return crashed

    def _reschedule(self, node):
        if node.shutting_down or node not in self.registered_collections:
            return
        while self.workqueue and self._pending_of(self.assigned_work[node]) < 2:
            self._assign_work_unit(node)
        if not self.workqueue:
            node.shutdown()
