import pytest

from domaintune.data.pii import redact_pii


@pytest.mark.parametrize(
    "text",
    [
        "call 415-555-0132 today",
        "(415) 555-0132",
        "+1 212 555 0199",
        "+44 20 7946 0958",
        "UK mobile +44 7700 900123.",
        "Japan 090-1234-5678",
    ],
)
def test_international_and_north_american_phones_are_redacted(text):
    redacted, counts = redact_pii(text)
    assert counts == {"phone": 1} and "[PHONE]" in redacted


@pytest.mark.parametrize(
    "text",
    [
        "dose 120-130 mg",
        "BP 120/80",
        "on 2026-01-05",
        "lab 5.5-7.0 mmol/L",
        "ISBN 978-3-16-148410-0",
        "order #48213",
        "2026-10-31 to 2026-11-02",
        "SKU 0123-45",
    ],
)
def test_numbers_that_are_not_phones_stay(text):
    assert redact_pii(text) == (text, {})
