"""service/approvals/rules.py: the [[approvals.rules]] section, checked at start-up."""

from __future__ import annotations

import pytest

from schemas.errors import ConfigError
from service.approvals.rules import DEFAULT_EXPIRES, ApprovalRules
from service.auth.policy import Policy


def rules(text: str) -> ApprovalRules:
    return ApprovalRules.from_policy(Policy.from_toml(text).raw)


def test_the_contract_example_parses_and_the_first_matching_rule_applies() -> None:
    parsed = rules(
        '[[approvals.rules]]\npaths = ["prod/**"]\nrequired = 2\nexpires = "72h"\n'
        '[[approvals.rules]]\npaths = ["**"]\n'
    )
    first = parsed.rule_for("prod/db")
    assert first is not None and (first.required, first.expires) == (2, 72 * 3600)
    other = parsed.rule_for("dev/db")
    assert other is not None and (other.required, other.expires) == (1, DEFAULT_EXPIRES)
    assert parsed.rule_for(".secrets-service/changes/x") is None  # the service's own folder


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ('paths = ["prod/**"]\nrequird = 2', "approvals.rules[0].requird"),
        ("required = 2", "approvals.rules[0].paths"),
        ('paths = ["prod/**"]\nrequired = 0', "approvals.rules[0].required"),
        ('paths = ["prod/**"]\nrequired = 11', "approvals.rules[0].required"),
        ('paths = ["prod/**"]\nrequired = true', "approvals.rules[0].required"),
        ('paths = ["prod/**"]\nexpires = "soon"', "approvals.rules[0].expires"),
        ('paths = ["prod/**"]\nexpires = "0s"', "approvals.rules[0].expires"),
        ('paths = ["/bad"]', "approvals.rules[0].paths[0]"),
    ],
)
def test_a_wrong_rule_names_itself_and_its_key(table: str, named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        rules(f"[[approvals.rules]]\n{table}\n")
    assert caught.value.setting == "SECRETS_POLICY_FILE"
    assert caught.value.problem.startswith(named)


def test_an_unknown_key_in_the_section_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        rules("[approvals]\nrule = []\n")
    assert "approvals.rule" in caught.value.problem
