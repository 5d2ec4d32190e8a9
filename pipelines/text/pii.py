"""PII masking with typed placeholders: emails, phones, US SSNs, payment cards, IP addresses, secrets in code.

Masked text becomes training data, so precision matters as much as recall: every pattern is anchored on
boundaries that version numbers, dates, hashes, UUIDs, decimals, ranges and numbers in code do not have,
and candidates are validated (Luhn and issuer prefix for cards, `ipaddress` for IPs, SSA rules for SSNs).
Regexes are the field's tool here (datatrove, BigCode): no NER model is needed for these structured types.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

import phonenumbers
from phonenumbers import Leniency

from cpt.shared.dataset import PII_TYPES

PLACEHOLDERS = {kind: f"[{kind.upper()}]" for kind in PII_TYPES}
_MAX_PASSES = 4


@dataclass(frozen=True)
class _Rule:
    """One PII pattern: what it masks, and a check that a candidate match really is PII."""

    kind: str
    pattern: re.Pattern[str]
    is_pii: Callable[[re.Match[str]], bool] = lambda match: True


# --- secrets in code -------------------------------------------------------------------------------------

_PRIVATE_KEY = re.compile(
    # A truncated block (no END line) is still a leaked key: mask up to the first character that cannot be
    # part of the base64 body or its headers (a closing quote in code, say).
    r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"
    r"[A-Za-z0-9+/=\s:,.\\-]*?(?:-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|(?=[^A-Za-z0-9+/=\s:,.\\-])|\Z)"
)
_TOKEN = re.compile(
    r"(?<![A-Za-z0-9_])(?:"
    r"(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|A3T[A-Z0-9])[A-Z0-9]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255}"  # GitHub tokens
    r"|xox[abposr]-[A-Za-z0-9-]{10,250}"  # Slack tokens
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API key
    r"|(?:sk|rk)_live_[0-9A-Za-z]{16,247}"  # Stripe secret keys
    r"|glpat-[0-9A-Za-z_-]{20}"  # GitLab personal access token
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JSON web token
    r")(?![A-Za-z0-9_])"
    r"|https://hooks\.slack\.com/services/[A-Za-z0-9/]{20,}"
    r"|(?<=Bearer )[A-Za-z0-9._~+/-]{20,}=*"
)
# The scheme is bounded and starts a run, so a long `a.a.a.a...` is not rescanned from every letter.
_URL_CREDENTIALS = re.compile(
    r"(?<![a-z0-9+.-])[a-z][a-z0-9+.-]{0,30}://[^\s:/@]{1,256}:(?P<pii>[^\s/@]{1,256})@", re.IGNORECASE
)

_PASSWORD_KEYS = r"password|passwd|pwd|passphrase"
_SECRET_KEYS = (
    r"secret(?:[_-]?key)?|client[_-]?secret|api[_-]?key|apikey|access[_-]?key|private[_-]?key"
    r"|(?:auth|access|refresh|bearer)?[_-]?token"
)
_KEY = rf"(?<![A-Za-z0-9])(?P<key>{_PASSWORD_KEYS}|{_SECRET_KEYS})(?![A-Za-z0-9])"
_OPERATOR = r"[\"']?\]?[ \t]*(?::=|=>|==?|:)[ \t]*"
_QUOTED_ASSIGNMENT = re.compile(rf"{_KEY}{_OPERATOR}(?P<q>[\"'`])(?P<pii>[^\"'`\n]{{1,200}})(?P=q)", re.IGNORECASE)
# Unquoted values only in config-file lines (.env, ini, YAML): the whole rest of the line is the value.
_CONFIG_ASSIGNMENT = re.compile(
    rf"^[ \t]*(?:export[ \t]+)?[\w.-]*?{_KEY}{_OPERATOR}(?P<pii>[^\s\"'`]{{1,200}})[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)
# Values that are not secrets: templates, env references, type names, and special tokens like "<pad>".
_PLACEHOLDER_VALUE = re.compile(
    r"(?:<.*>|\[.*\]|\{.*\}|\$\{?[A-Za-z_]\w*\}?|%\(?\w*\)?[sd]|%\w+%|(.)\1*|\.\.\.|(?:your|my|insert|enter)[_ -].*"
    r"|none|null|nil|true|false|undefined|required|optional|str|string|int|bytes|bool|any|secretstr"
    r"|password|passwd|secret|token|api[_-]?key)",
    re.IGNORECASE,
)
# Unquoted values that are code, not secrets: `args.password`, `getpass()`, `env["PW"]`, `password=password,`.
_CODE_VALUE = re.compile(r"[A-Za-z_][\w.]*(?:\(.*\)|\[.*\])[,;]?|[A-Za-z_]\w*(?:\.\w+)+|[A-Za-z_]\w*[,;]")


def _char_classes(value: str) -> int:
    return sum((any(c.islower() for c in value), any(c.isupper() for c in value), any(c.isdigit() for c in value)))


def _is_secret_value(match: re.Match[str]) -> bool:
    """An assigned value is a secret unless it is a placeholder, a name, or (for tokens) too plain to be one."""
    key, value = match["key"].lower(), match["pii"]
    if any(c.isspace() for c in value) or _PLACEHOLDER_VALUE.fullmatch(value):
        return False
    if key.strip("_-").replace("-", "_") in value.lower().replace("-", "_"):
        return False  # `api_key = OPENAI_API_KEY`, `password=password`
    if match.re is _CONFIG_ASSIGNMENT and _CODE_VALUE.fullmatch(value):
        return False
    if re.fullmatch(_PASSWORD_KEYS, key):
        return True
    # `token = "IDENT"` in a lexer is not a secret; real keys and tokens are long and mixed.
    return len(value) >= 20 or (len(value) >= 8 and _char_classes(value) >= 2)


def _has_password(match: re.Match[str]) -> bool:
    return not _PLACEHOLDER_VALUE.fullmatch(match["pii"])


# --- emails ----------------------------------------------------------------------------------------------

_EMAIL = re.compile(
    # The local part starts with a letter or digit, so a quote or bracket around an address stays outside it;
    # it is at most 64 characters (RFC 5321), which also keeps `a=a=a=...` from being rescanned at every letter.
    r"(?<![\w.%+-])\w[\w.%+'-]{0,63}(?<!\.)"
    # Domain labels may be internationalised (`пример.рф`) or punycode (`xn--d1acufc.xn--p1ai`).
    r"@(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.)+(?P<tld>[^\W\d_]{2,24}|xn--[A-Za-z0-9-]{1,59})"
    r"(?![\w-]|\.[A-Za-z0-9])"
)
# `logo@2x.png` is an image name in web code, not an address.
_FILE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "gif", "svg", "webp", "ico", "bmp", "avif"})


def _is_email(match: re.Match[str]) -> bool:
    return match["tld"].lower() not in _FILE_EXTENSIONS


# --- IP addresses ----------------------------------------------------------------------------------------

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.])(?P<addr>{_OCTET}(?:\.{_OCTET}){{3}})(?:/(?:3[0-2]|[12]?\d))?(?!\w|\.\d)")
_IPV6 = re.compile(
    r"(?<![\w:.])(?P<addr>(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|:|"
    rf"{_OCTET}(?:\.{_OCTET}){{3}}))(?:%[A-Za-z0-9]+)?(?:/(?:12[0-8]|1[01]\d|[1-9]?\d))?(?![\w:]|\.\d)"
)
_VERSION_CONTEXT = re.compile(
    # A whole word (`__version__` too): `nameserver`, `driver` and `server` end in "ver" but name machines.
    r"(?:(?<![A-Za-z0-9])(?:version|ver|release|build)(?:s|ed|\.|_+)?[\"']?\s*[:=]?\s*[\"']?|(?:[=<>~!]=|\^|~)\s*)$",
    re.IGNORECASE,
)


# A version by its own shape: a product token before it (`Chrome/118.0.0.0`, `pkg@1.2.3.4`), a pre-release or
# build suffix after it (`1.2.3.4-beta`, `10.0.0.1+cu121`, `2.10.3.4rc1` is not matched at all).
_PRODUCT_BEFORE = re.compile(r"[A-Za-z][\w.+-]*[/@]$")
_VERSION_SUFFIX = re.compile(r"[-+~](?:alpha|beta|rc|dev|pre|post|snapshot|final|nightly|cu\d|cpu|[ab]\d)", re.I)


def _is_ipv4(match: re.Match[str]) -> bool:
    """An IPv4 address that names a machine (private ones too); not a version such as `1.2.3.4` or `==2.0.0.1`."""
    addr, text = match["addr"], match.string
    if all(len(part) == 1 for part in addr.split(".")):
        return False  # every part one digit: a version number far more often than an address
    if _VERSION_CONTEXT.search(text, max(0, match.start() - 20), match.start()):
        return False
    if _PRODUCT_BEFORE.search(text, max(0, match.start() - 40), match.start()) or _VERSION_SUFFIX.match(
        text, match.end()
    ):
        return False
    ip = ipaddress.IPv4Address(addr)
    # Loopback, 0.0.0.0 and netmasks (255.255.255.0) name no machine or person.
    return not (ip.is_loopback or ip.is_unspecified or addr.startswith("255."))


def _is_ipv6(match: re.Match[str]) -> bool:
    """A valid IPv6 address that is not C++/Rust `a::b`: it needs a digit and three groups when compressed."""
    addr = match["addr"]
    try:
        ip = ipaddress.IPv6Address(addr)
    except ValueError:
        return False
    groups = [group for group in re.split(r"[:.]", addr) if group]
    if not any(c.isdigit() for c in addr):
        return False
    # Compressed to one or two groups only from a unicast prefix (`2001:db8::1`, `fe80::1`, `fd12::7`):
    # `a1::b2`-like paths in code have neither four hex digits in front nor such a prefix.
    if (
        "::" in addr
        and len(groups) < 3
        and not re.fullmatch(r"(?:[23][0-9a-f]{3}|f[cd][0-9a-f]{2}|fe[89ab][0-9a-f])", groups[0].lower())
    ):
        return False
    return not (ip.is_loopback or ip.is_unspecified or ip.is_multicast)


# --- SSN, cards, phones ----------------------------------------------------------------------------------

_SSN = re.compile(
    # SSA rules: area not 000, 666 or 9xx; group not 00; serial not 0000.
    r"(?<![\w-])(?<!\d\.)(?!000|666|9\d\d)\d{3}(?P<sep>[- .])(?!00)\d{2}(?P=sep)(?!0000)\d{4}(?![\w-]|\.\d)"
    r"|(?<=[Ss][Ss][Nn])(?:[ \t]*(?:#|no\.?|number))?[ \t]*[:=]?[ \t]*(?P<pii>(?!000|666|9\d\d)\d{9})(?!\w)",
)
_CARD = re.compile(
    r"(?<![\w.,+-])(?:"
    r"\d{13,19}"  # plain
    r"|\d{4}(?P<sep>[ -])\d{4}(?P=sep)\d{4}(?P=sep)\d{1,4}(?:(?P=sep)\d{3})?"  # 4-4-4-4(-3)
    r"|\d{4}(?P<sep2>[ -])\d{6}(?P=sep2)\d{4,5}"  # Amex 4-6-5, Diners 4-6-4
    r")(?![\w-]|[.,]\d)"
)
# Issuer prefixes of the major networks (Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay, Maestro).
# Luhn alone lets one random number in ten through; millisecond timestamps (1.7e12) and ISBNs (978...) fail this.
_CARD_ISSUER = re.compile(r"4|5[0-8]|6|3[4-9]|30[0-5]|2(?:22[1-9]|2[3-9]\d|[3-6]\d\d|7[01]\d|720)|2131|1")


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, char in enumerate(reversed(digits)):
        d = int(char)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_card(match: re.Match[str]) -> bool:
    digits = re.sub(r"\D", "", match[0])
    if not 13 <= len(digits) <= 19 or not _CARD_ISSUER.match(digits):
        return False
    # JCB's 2131/1800 and UATP's 1 ranges only at 15 digits: 13-digit millisecond timestamps start with 1 too.
    return (len(digits) == 15 or not digits.startswith(("2131", "1"))) and _luhn_ok(digits)


_EXTENSION = r"(?:[ \t]?(?:x|ext\.?)[ \t]?\d{1,6})?"
_PHONE = re.compile(
    r"(?<![\w+.-])(?:"
    # US/NANP: (555) 123-4567, 555-123-4567, 555.123.4567 x12, +1 555 123 4567, 001-555-123-4567, 1-800-555-1234
    rf"(?:(?:\+|00)?1[ .-]?)?(?:\(\d{{3}}\)[ .-]?|\d{{3}}[.-])\d{{3}}[ .-]\d{{4}}{_EXTENSION}"
    # space-separated without a prefix only with a valid NANP area code and exchange (not "100 200 3000")
    rf"|(?:\+?1[ ])?[2-9]\d\d [2-9]\d\d \d{{4}}{_EXTENSION}"
    rf"|\+1[ ]?\d{{3}} \d{{3}} \d{{4}}{_EXTENSION}"
    # international, E.164 style with a '+': +44 20 7946 0958, +49 (0) 30 1234567, +33 1 23 45 67 89
    r"|\+[2-9]\d{0,2}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,5}+){1,6}+"
    r")(?![\w-]|[.,:]\d)"
)


def _is_phone(match: re.Match[str]) -> bool:
    """10–15 digits before any extension (E.164 allows 15); 9 suffice after a non-US country code."""
    digits = sum(c.isdigit() for c in re.split(r"x|ext", match[0], maxsplit=1)[0])
    return (9 if re.match(r"\+[2-9]", match[0]) else 10) <= digits <= 15


# Other regions' numbers (Presidio's recognizer uses the same library): a cheap regex finds digit groups that
# could be one (8-15 digits, separators or a '+' / 00 prefix), and only those reach `phonenumbers`, which knows
# each region's numbering plan. National numbers must be valid in a region *and* grouped as that region writes
# them (STRICT_GROUPING), so dates, ISBNs, SKUs and ranges, valid by digits alone somewhere, survive.
_PHONE_REGIONS = ("GB", "DE", "FR", "IT", "ES", "NL", "IN", "JP", "CN", "KR", "BR", "MX", "AU", "IL", "RU")
_OTHER_PHONE = re.compile(
    # The lookahead wants 8 digits before any Python runs: most digit runs in text are shorter.
    r"(?<![\w+.,:/-])(?=(?:[ ./()+-]{0,3}\d){8})"
    r"(?:(?P<intl>\+|00)[1-9]\d{0,2}[ .-]?)?(?:\(\d{1,5}\)[ .-]?)?\d{1,12}(?:[ ./-]\d{1,8}){0,5}"
    r"(?![\w-]|[.,:/]\d)"
)
# Shapes phonenumbers would spend a millisecond on to refuse: dates (`2024-03-07`, `06 07 2024`), dotted quads.
_DATE_OR_QUAD = re.compile(
    r"\d{4}([-./ ])\d{1,2}\1\d{1,2}|\d{1,2}([-./ ])\d{1,2}\2(?:1[89]|2\d)\d\d|\d{1,3}(?:\.\d{1,3}){3}"
)
# A bare digit run (no separator, no '+') is a phone only after a word that says so: `My CN number is 13812345678`.
_PHONE_CONTEXT = re.compile(
    r"(?:phone|tel|mobile|cell|call|fax|whatsapp|number|contact|电话|手机)\W{0,3}(?:\w+\W{1,3}){0,2}$", re.I
)
# Numbers that identify things, not people: `ISBN 0-306-40615-2`, `SKU 0451-2210-77`, `order #1234 5678`.
_NOT_PHONE_CONTEXT = re.compile(
    r"(?:isbn|issn|sku|order|invoice|ref|part|serial|model|item|case|ticket|patent|doi|lot)\W{0,4}(?:no\.?|#)?\W{0,2}$",
    re.I,
)


@functools.lru_cache(maxsize=4096)  # the same candidate (a date format, a code constant) recurs within a corpus
def _is_valid_phone(candidate: str, international: bool) -> bool:
    if international:
        return any(True for _ in phonenumbers.PhoneNumberMatcher(candidate, None, leniency=Leniency.VALID))
    digits = sum(c.isdigit() for c in candidate)
    for region in _PHONE_REGIONS:
        try:  # parsing first is ~10x cheaper than the matcher, and refuses most candidates
            if not phonenumbers.is_valid_number(phonenumbers.parse(candidate, region)):
                continue
        except phonenumbers.NumberParseException:
            continue
        for found in phonenumbers.PhoneNumberMatcher(candidate, region, leniency=Leniency.STRICT_GROUPING):
            # The whole candidate, not a number inside it (`2024 0115 1234` holds a valid 8-digit number).
            if sum(c.isdigit() for c in found.raw_string) == digits:
                return True
    return False


def _is_other_phone(match: re.Match[str]) -> bool:
    text, candidate = match.string, match[0]
    digits = sum(c.isdigit() for c in candidate)
    if not 8 <= digits <= 15:
        return False
    before = text[max(0, match.start() - 30) : match.start()]
    if _NOT_PHONE_CONTEXT.search(before) or _VERSION_CONTEXT.search(before[-20:]):
        return False
    international = match["intl"] is not None
    if not international:
        if _DATE_OR_QUAD.fullmatch(candidate):
            return False
        groups = re.split(r"[ ./()-]+", candidate.strip("()"))
        if not any(c in candidate for c in " ./-()") and not _PHONE_CONTEXT.search(before):
            return False
        if len(groups[-1]) == 1 or re.fullmatch(r"\d+\.\d+", candidate):
            return False  # an ISBN's check digit (`0-306-40615-2`), a decimal (`7264.603879`)
        if [len(g) for g in groups] == [3, 2, 4] or ("." in candidate and re.search(r"[ /()-]", candidate)):
            return False  # SSN-shaped (the SSN rule decides: `078-05-0000` is none), or `693-09.4444`
    if international and match["intl"] == "00":
        candidate = "+" + candidate[2:]
    return _is_valid_phone(candidate, international)


_SECRET_RULES = (
    _Rule("secret", _PRIVATE_KEY),
    _Rule("secret", _TOKEN),
    _Rule("secret", _URL_CREDENTIALS, _has_password),
    _Rule("secret", _QUOTED_ASSIGNMENT, _is_secret_value),
    _Rule("secret", _CONFIG_ASSIGNMENT, _is_secret_value),
)
_PERSONAL_RULES = (
    _Rule("email", _EMAIL, _is_email),
    _Rule("ip", _IPV6, _is_ipv6),
    _Rule("ip", _IPV4, _is_ipv4),
    _Rule("ssn", _SSN),
    _Rule("card", _CARD, _is_card),
    _Rule("phone", _PHONE, _is_phone),
    _Rule("phone", _OTHER_PHONE, _is_other_phone),
)


def _apply(rule: _Rule, text: str, counts: dict[str, int]) -> str:
    """Replace every validated match of one rule (its `pii` group when it has one) by the placeholder."""
    placeholder = PLACEHOLDERS[rule.kind]
    has_group = "pii" in rule.pattern.groupindex

    def replace(match: re.Match[str]) -> str:
        if not rule.is_pii(match):
            return match[0]
        counts[rule.kind] += 1
        if has_group and match["pii"] is not None:
            start, end = match.start("pii") - match.start(), match.end("pii") - match.start()
            return match[0][:start] + placeholder + match[0][end:]
        return placeholder

    return rule.pattern.sub(replace, text)


def mask_pii(text: str, secrets: bool = True) -> tuple[str, dict[str, int]]:
    """Mask PII with typed placeholders ([EMAIL] [PHONE] [SSN] [CARD] [IP] [SECRET]); also count per type.

    The counts always have every key of PII_TYPES. `secrets=False` skips the code-secret patterns (keys,
    tokens, private-key blocks, password/api_key/secret/token assignments). Idempotent:
    `mask_pii(mask_pii(t)[0]) == (mask_pii(t)[0], all zeros)`. Secrets go first, so a token that contains an
    email-like or number-like part is masked whole.
    """
    counts = dict.fromkeys(PII_TYPES, 0)
    rules = (_SECRET_RULES if secrets else ()) + _PERSONAL_RULES
    # Repeat until a pass masks nothing: a placeholder can expose a neighbour that a boundary rule hid
    # (`(555) 123-4567(555) 123-4567`), and idempotency needs that neighbour masked now. Text without PII
    # takes one pass; the bound only guards against a pattern that could match its own placeholder.
    for _ in range(_MAX_PASSES):
        masked_before = sum(counts.values())
        for rule in rules:
            text = _apply(rule, text, counts)
        if sum(counts.values()) == masked_before:
            break
    return text, counts
