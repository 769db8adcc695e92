"""Every admission refusal reason has a bounded metric label (rows.REJECT_LABEL_OF)."""

from __future__ import annotations

from prefork_proxy.admission.verdicts import REASONS
from prefork_proxy.rows import REJECT_LABELS, reject_label


def test_every_known_reason_has_a_label_that_is_not_other():
    unlabelled = sorted(reason for reason in REASONS if reject_label(reason) == "other")
    assert unlabelled == []
    assert {reject_label(reason) for reason in REASONS} <= set(REJECT_LABELS)


def test_an_unknown_reason_is_other_and_the_table_picks_exact_names_first():
    assert reject_label("something_new") == "other"
    assert reject_label("proxy_timeout") == "client_timeout"  # not bad_proxy_header
    assert reject_label("proxy_bad_signature") == "bad_proxy_header"
    assert reject_label("sni_no_route") == "no_route"
