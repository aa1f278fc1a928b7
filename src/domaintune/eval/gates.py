"""Pass/fail gates written in the YAML as `name op number`, parsed with a regex (never eval())."""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Any

_OPS = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}
_GATE_RE = re.compile(
    r"^\s*(?P<name>[A-Za-z_][A-Za-z0-9_.\-]*)\s*(?P<op>>=|<=|==|!=|>|<)\s*"
    r"(?P<value>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*(?P<pct>%?)\s*$"
)


@dataclass(frozen=True)
class Gate:
    text: str
    name: str
    op: str
    threshold: float

    def check(self, value: float) -> bool:
        return _OPS[self.op](value, self.threshold)


def parse_gate(text: str) -> Gate:
    """`rougeL_char_delta >= 2` -> Gate; a `%` suffix divides by 100 (`retention >= 95%`)."""
    if not isinstance(text, str):
        raise ValueError(f"gate {text!r}: expected a string like 'retention >= 0.95'")
    match = _GATE_RE.match(text)
    if not match:
        raise ValueError(
            f"gate {text!r}: expected `metric op number` with op one of {', '.join(_OPS)} "
            "(e.g. 'rougeL_char_delta >= 2' or 'retention >= 0.95')"
        )
    value = float(match["value"])
    if match["pct"]:
        value /= 100.0
    return Gate(text=text.strip(), name=match["name"], op=match["op"], threshold=value)


def evaluate_gates(gates: list[str], values: dict[str, Any]) -> dict[str, Any]:
    """Check every gate against the flat `values` table; unknown names and missing values fail with a reason."""
    results = []
    failures: list[str] = []
    for text in gates:
        gate = parse_gate(text)
        value = values.get(gate.name)
        if gate.name not in values:
            close = sorted(k for k in values if gate.name.split("_")[0].lower() in k.lower())[:8]
            reason = f"{gate.text}: unknown metric {gate.name!r}" + (
                f" (did you mean one of {close}?)" if close else ""
            )
            ok = False
        elif value is None or (isinstance(value, float) and math.isnan(value)):
            reason = f"{gate.text}: {gate.name} was not measured in this run"
            ok = False
        else:
            ok = gate.check(float(value))
            reason = f"{gate.text}: got {gate.name} = {float(value):.4g}"  # reported only when it failed
        results.append({"gate": gate.text, "value": value, "passed": ok})
        if not ok:
            failures.append(reason)
    return {"passed": not failures, "failures": failures, "results": results}


def gate_set(name: str, set_names: set[str]) -> str:
    """The eval set a gate name reads: `sets.<set>.<...>`, `<set>.<model>.<metric>` (a set of `set_names`),
    `retention` / `<model>.retention` (the retention set, `general`), every other un-prefixed name `test`."""
    parts = name.split(".")
    if parts[0] == "sets" and len(parts) > 2:
        return parts[1]
    if len(parts) > 2 and parts[0] in set_names:
        return parts[0]
    if parts[-1] == "retention" and len(parts) <= 2:
        return "general"
    return "test"
