"""Per-team quotas (``[quotas]`` in plugins.toml): sandboxes, running sandboxes, snapshots, rules.

The service asks before it takes anything a team is limited on: a create (a new sandbox), a
resume (a paused sandbox runs again), a snapshot (or a fork, which snapshots first) and a network
policy (at create and on update). A check that fails raises :class:`QuotaExceededError`, which the
API plugin answers as 429. Usage is counted from the state store, so freeing a slot (kill, delete a
snapshot) lets the next request in at once, and the counts survive restarts.

Checks are synchronous and the service calls them in the same step (no ``await`` in between) as
the write that takes the slot, so two concurrent creates cannot both take the last one.
"""

from __future__ import annotations

from cube_core.config import QuotaSettings, TeamQuota
from cube_core.errors import QuotaExceededError
from cube_core.models import NetworkPolicy
from cube_core.state import SandboxState
from cube_core.store import StateStore

#: States that hold a sandbox slot: a paused sandbox keeps its memory image and disk.
HELD = (SandboxState.CREATING, SandboxState.RUNNING, SandboxState.PAUSED)
#: States that hold a running slot.
RUNNING = (SandboxState.CREATING, SandboxState.RUNNING)


class Quotas:
    """Checks a team's usage against its limits; raises :class:`QuotaExceededError`."""

    def __init__(self, settings: QuotaSettings, store: StateStore) -> None:
        self.settings = settings
        self.store = store

    def _team(self, team_id: str) -> tuple[str, TeamQuota]:
        team = self.store.get_team(team_id)
        name = team.name if team is not None else team_id
        return name, self.settings.for_team(name)

    def usage(self, team_id: str) -> dict[str, int]:
        """What the team holds now, by the name of the limit it counts against."""
        held, running = self._sandboxes(team_id)
        return {"max_sandboxes": held, "max_running": running,
                "max_snapshots": len(self.store.list_snapshots(team_id=team_id))}

    def _sandboxes(self, team_id: str) -> tuple[int, int]:
        """(sandboxes held, running) of the team: counted by the store, no record parsed."""
        held = self.store.sandbox_totals(team_id=team_id, states=HELD)
        return sum(t.count for t in held), sum(t.count for t in held if t.state in RUNNING)

    def _check(self, team_id: str, name: str, limit: int | None, current: int, wanted: int, resource: str,
               hint: str) -> None:
        if limit is not None and current + wanted > limit:
            raise QuotaExceededError(
                f"team {name!r} is at its quota of {limit} {resource} ({current} in use"
                f"{f', {wanted} asked for' if wanted > 1 else ''}); {hint}",
                team=name, team_id=team_id, resource=resource, limit=limit, current=current)

    def check_create(self, team_id: str, network: NetworkPolicy | None = None, *, count: int = 1) -> None:
        """``count`` new sandboxes (with egress ``network``) would fit."""
        name, limits = self._team(team_id)
        if network is not None:
            self._check_rules(team_id, name, limits, network)
        if limits.max_sandboxes is None and limits.max_running is None:
            return  # nothing to count against (every create asks)
        held, running = self._sandboxes(team_id)
        self._check(team_id, name, limits.max_sandboxes, held, count,
                    "sandboxes (running + paused)", "kill one first (a paused sandbox counts)")
        self._check(team_id, name, limits.max_running, running, count,
                    "running sandboxes", "pause or kill one first")

    def check_resume(self, team_id: str) -> None:
        """A paused sandbox of the team may run again."""
        name, limits = self._team(team_id)
        if limits.max_running is None:
            return
        self._check(team_id, name, limits.max_running, self._sandboxes(team_id)[1], 1,
                    "running sandboxes", "pause or kill one first")

    def check_snapshot(self, team_id: str) -> None:
        """The team may keep one more snapshot."""
        name, limits = self._team(team_id)
        self._check(team_id, name, limits.max_snapshots, self.usage(team_id)["max_snapshots"], 1,
                    "snapshots", "delete one first (DELETE /templates/<snapshotID>)")

    def check_fork(self, team_id: str, count: int) -> None:
        """A fork takes one snapshot and ``count`` sandboxes: refuse it whole rather than half done."""
        self.check_snapshot(team_id)
        self.check_create(team_id, count=count)

    def check_policy(self, team_id: str, policy: NetworkPolicy) -> None:
        """An egress policy has no more entries than the team may have in one policy."""
        name, limits = self._team(team_id)
        self._check_rules(team_id, name, limits, policy)

    def _check_rules(self, team_id: str, name: str, limits: TeamQuota, policy: NetworkPolicy) -> None:
        rules = len(policy.allow_out) + len(policy.deny_out)
        if limits.max_network_rules is not None and rules > limits.max_network_rules:
            raise QuotaExceededError(
                f"team {name!r} may have at most {limits.max_network_rules} egress rules per sandbox "
                f"(allowOut + denyOut), this policy has {rules}",
                team=name, team_id=team_id, resource="egress rules per sandbox",
                limit=limits.max_network_rules, current=rules)
