"""The deployment gate: a model with a known BatchNorm failure is not written, nor passed as deployable.

Every command that writes a deployable model (``fold-export``, ``recalibrate``) and
:func:`bncal.assert_deployable` ask :func:`require_healthy`, which runs the static rules of
``bncal inspect`` (:func:`bncal.inspect.inspect_model`, the one rulebook) and refuses a model
with an error-severity finding (BN001 statistics never updated, BN002 degenerate statistics,
BN005 training-mode BatchNormalization in an inference graph, and any rule rated an error
later) with :class:`bncal.errors.DeploymentError`: one line per finding, its evidence and fix.
A finding the user accepts explicitly (``allow=["BN001"]``, ``--allow BN001``) lets the model
through, with a note in the report.

:func:`bncal.assert_deployable` (:mod:`bncal.api`) adds the train/inference check (with ``data``) and the accuracy guard
(with ``guard``, :mod:`bncal.guard`), for a project's own test suite::

    import bncal
    bncal.assert_deployable(model)                       # static rules only
    bncal.assert_deployable("model.onnx", data=batches)  # and the check on these batches
"""

from __future__ import annotations

import dataclasses

from .errors import BncalError, DeploymentError
from .report import ReportDisplay

__all__ = ["require_healthy", "require_healthy_notes", "refused_findings", "refusal", "allowed_rules", "allowed_notes",
           "DeploymentReport"]


def allowed_rules(allow) -> frozenset[str]:
    """``allow`` (a rule id, or several) as a set of known rule ids; an unknown id is refused."""
    from .inspect.model import RULES

    if allow is None:
        return frozenset()
    ids = [allow] if isinstance(allow, str) else list(allow)
    rules = frozenset(str(rule).strip().upper() for rule in ids)
    unknown = sorted(rules - set(RULES))
    if unknown:
        raise BncalError(f"cannot allow {', '.join(unknown)}: not a rule of bncal inspect; the rules are "
                         f"{', '.join(RULES)}")
    return rules


def _layers(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def refusal(findings, action: str) -> str:
    """One line naming each refused finding (rule, title, evidence with its layers, fix) and how to accept
    it; ``action`` is what was refused (``"export it"``, ``"write it"``)."""
    from .inspect.model import RULES

    parts = [f"{f.rule_id} {f.severity}, {RULES[f.rule_id][1]}: {f.evidence} fix: {f.fix}" for f in findings]
    accept = " ".join(f"--allow {f.rule_id}" for f in findings)
    ids = ", ".join(repr(f.rule_id) for f in findings)
    return (f"refusing to {action}: {' | '.join(parts)}; to {action} anyway, accept "
            f"{'it' if len(findings) == 1 else 'them'} explicitly: {accept} (allow=[{ids}] in Python)")


def allowed_notes(findings, allow) -> list[str]:
    """Notes for the error ``findings`` that the gate let through because ``allow`` names their rule."""
    from .inspect.model import RULES

    allowed = allowed_rules(allow)
    return [f"{f.rule_id} allowed: {RULES[f.rule_id][1]} ({_layers(f.layers)})"
            for f in findings if f.severity == "error" and f.rule_id in allowed]


def refused_findings(report, allow) -> list:
    """The error-severity findings of an inspect ``report`` whose rule ``allow`` does not name."""
    allowed = allowed_rules(allow)
    return [f for f in report.findings if f.severity == "error" and f.rule_id not in allowed]


def require_healthy(model, *, allow=(), action: str = "export it") -> object:
    """Run ``bncal inspect``'s rules on ``model`` (a PyTorch module, an ONNX model or its path, a
    Keras model) and raise :class:`DeploymentError` (``report`` a :class:`DeploymentReport`) for
    every error-severity finding whose rule is not in ``allow``; ``action`` says what is refused
    (``"export it"``, ``"write it"``). Returns the :class:`bncal.inspect.model.InspectReport`."""
    from .inspect import inspect_model

    report = inspect_model(model)
    refused = refused_findings(report, allow)
    if refused:
        raise DeploymentError(refusal(refused, action), report=DeploymentReport(inspect=report))
    return report


def require_healthy_notes(model, *, allow=(), action: str = "export it") -> list[str]:
    """:func:`require_healthy`, returning the notes a report keeps for the errors ``allow`` accepted."""
    return allowed_notes(require_healthy(model, allow=allow, action=action).findings, allow)


@dataclasses.dataclass(repr=False)
class DeploymentReport(ReportDisplay):
    """What :func:`bncal.assert_deployable` found: the inspection, and the check and guard where run (else None).

    ``allowed`` lists the error findings accepted by ``allow``; ``reasons`` say what failed.
    """

    inspect: object
    check: object = None
    guard: object = None
    allowed: list[str] = dataclasses.field(default_factory=list)
    reasons: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.reasons

    def summary(self) -> str:
        ran = ["inspect"] + ["check"] * (self.check is not None) + ["guard"] * (self.guard is not None)
        verdict = "deployable" if self.passed else f"NOT deployable: {self.reasons[0]}"
        return f"{'PASSED' if self.passed else 'FAILED'} ({', '.join(ran)}): {verdict}"

    def table(self) -> str:
        parts = [self.inspect.table()]
        if self.check is not None:
            parts.append(self.check.table())
        if self.guard is not None:
            parts.append(self.guard.table())
        parts += [f"note: {line}" for line in self.allowed]
        parts.append("PASSED: deployable" if self.passed else "FAILED: " + "; ".join(self.reasons))
        return "\n\n".join(parts)
