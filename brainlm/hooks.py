"""Hooks: installed plug-ins that hear about what the platform recorded, without the library knowing them.

    brainlm ingest ──new data version──> cohort_versioned(CohortVersioned) ──> every installed hook

A hook is a function `(CohortVersioned) -> str | None` registered under the entry-point group
`brainlm.cohort_versioned` by an installed package (pyproject.toml, `[project.entry-points."brainlm.cohort_versioned"]`);
the line it returns, if any, says what it did. brainlm's own `prefect` hook (flows/events.py) tells a configured
Prefect server, whose automation re-evaluates the champion on the new version. The library never imports a hook's
package: an orchestrator plugs in here instead (the layering contracts in pyproject.toml keep Prefect out of
brainlm/).

An event holds names, counts and the data version only: never a participant id.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points

from brainlm.errors import BrainLMError

COHORT_VERSIONED = "brainlm.cohort_versioned"  # the entry-point group


class HookError(BrainLMError):
    """An installed hook could not be loaded or failed; the data it was told about is recorded regardless."""


@dataclass(frozen=True)
class CohortVersioned:
    """A cohort stored as a new data version (the store's DVC version changed)."""

    cohort: str
    data_version: str  # `<md5>@<git rev>`: the tag every MLflow run on this data carries
    recordings: int
    participants: int

    @classmethod
    def from_report(cls, report) -> CohortVersioned | None:
        """The event of an ingest (`brainlm.data.ingest.IngestReport`); None when it recorded no new version."""
        if not report.new_version or report.version is None:
            return None
        return cls(cohort=report.cohort, data_version=report.version.tag, recordings=len(report.manifest),
                   participants=int(report.manifest["participant"].nunique()))


def cohort_versioned(event: CohortVersioned) -> list[str]:
    """Call every installed `brainlm.cohort_versioned` hook with `event`; returns the lines they reported."""
    lines = []
    for hook in sorted(entry_points(group=COHORT_VERSIONED), key=lambda ep: ep.name):
        try:
            function = hook.load()
        except ImportError as e:
            raise HookError(f"the {COHORT_VERSIONED} hook {hook.name!r} ({hook.value}) cannot be imported: {e}; "
                            f"reinstall brainlm with its flows (make install)") from e
        line = function(event)
        if line:
            lines.append(line)
    return lines
