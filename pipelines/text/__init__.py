"""The text library: pure functions (no Beam) that clean, mask, identify and filter one document.

    >>> from cpt.pipelines.text import mask_pii
    >>> mask_pii("mail jane@example.com")
    ('mail [EMAIL]', {'email': 1, 'phone': 0, 'ssn': 0, 'card': 0, 'ip': 0, 'secret': 0})

Filters return a rejection reason (a short string) or None to keep the document.
"""

from cpt.pipelines.text.dedup import dedup_key, normalize_for_dedup
from cpt.pipelines.text.filters import check_code, check_length
from cpt.pipelines.text.html import html_to_text, sniff_html
from cpt.pipelines.text.language import check_language, detect_language, language_reason
from cpt.pipelines.text.pii import PII_TYPES, mask_pii
from cpt.pipelines.text.quality import c4_lines, check_fineweb_lines, check_gopher_quality, check_gopher_repetition

__all__ = [
    "PII_TYPES",
    "c4_lines",
    "check_fineweb_lines",
    "check_gopher_quality",
    "check_gopher_repetition",
    "check_code",
    "check_language",
    "check_length",
    "dedup_key",
    "detect_language",
    "html_to_text",
    "language_reason",
    "mask_pii",
    "normalize_for_dedup",
    "sniff_html",
]
