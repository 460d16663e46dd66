"""Secret and PII matchers for output scanning (see ``output_match`` for the matcher contract).

Secrets (kind ``secret``): the token patterns of the ``detect-secrets`` plugins listed in
:data:`PLUGIN_RULES` whose reach is bounded (a repeat such as ``{36}``, not ``+``), used as the
plugins define them; the plugins with unbounded patterns get a bounded pattern here that finds
the token's start (:data:`BOUNDED_OVERRIDES`: Slack, JWT, PyPI) and an extension that goes on
redacting the rest of the token; private-key headers (``BEGIN RSA PRIVATE KEY`` ...) redact the
whole PEM block up to its END line; and a generic high-entropy rule for long random-looking
runs (entropy measured by detect-secrets' ``Base64HighEntropyString``).

PII (kind ``pii``): e-mail addresses, phone numbers (international ``+`` numbers and North
American ``(555) 123-4567`` forms) and payment card numbers (13-19 digits, an issuer prefix,
card-style grouping, Luhn-checked with python-stdnum).

Each rule is a :class:`~bastion.detectors.output_match.RegexMatcher` whose ``max_span`` follows
from its pattern; the longest is the e-mail rule (136 characters), which sets the default
hold-back window of a guard that uses it.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable

from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
from detect_secrets.plugins.discord import DiscordBotTokenDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.high_entropy_strings import Base64HighEntropyString
from detect_secrets.plugins.jwt import JwtTokenDetector
from detect_secrets.plugins.mailchimp import MailchimpDetector
from detect_secrets.plugins.private_key import PrivateKeyDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.square_oauth import SquareOAuthDetector
from detect_secrets.plugins.stripe import StripeDetector
from detect_secrets.plugins.telegram_token import TelegramBotTokenDetector
from detect_secrets.plugins.twilio import TwilioKeyDetector
from stdnum import luhn

from bastion.detectors.output_match import (Action, PemExtension, RegexMatcher, RunExtension,
                                            as_action, regex_bounds)

#: detect-secrets plugins whose bounded patterns are used as they are: rule name -> plugin.
#: (AWS's second pattern, ``aws ... key ... '<40 chars>'``, redacts only the quoted key.)
PLUGIN_RULES = {
    "aws_access_key": AWSKeyDetector,
    "azure_storage_key": AzureStorageKeyDetector,
    "discord_token": DiscordBotTokenDetector,
    "github_token": GitHubTokenDetector,
    "gitlab_token": GitLabTokenDetector,
    "mailchimp_key": MailchimpDetector,
    "sendgrid_key": SendGridDetector,
    "square_oauth": SquareOAuthDetector,
    "stripe_key": StripeDetector,
    "telegram_token": TelegramBotTokenDetector,
    "twilio_key": TwilioKeyDetector,
}

#: Rule names for a plugin's second (third ...) pattern where it finds something else.
PATTERN_NAMES = {("aws_access_key", 1): "aws_secret_key"}
#: The group that is the secret where a pattern also matches its context.
PATTERN_GROUPS = {("aws_access_key", 1): 1}

#: Longest plugin pattern used (GitLab's ``glagent-`` tokens, up to 1032 characters, are left
#: to the high-entropy rule's extension instead of a 1 KiB hold-back window).
MAX_PLUGIN_SPAN = 128

_TOKEN_TAIL = "A-Za-z0-9_-"


def _jwt_header_is_json(text: str) -> bool:
    return JwtTokenDetector.is_formally_valid(text.split(".", 1)[0])


#: Bounded patterns for detect-secrets plugins whose own patterns are unbounded (``+``, ``{70,}``):
#: (rule name, pattern that finds the token's start, validator, characters of the token's rest).
BOUNDED_OVERRIDES = (
    # SlackDetector: xox[abposr]-(?:\d+-)+[a-z0-9]+ (case-insensitive)
    ("slack_token", re.compile(r"xox[abposr]-(?:[0-9]{1,15}-){1,3}[a-z0-9]{1,8}", re.I),
     None, "A-Za-z0-9-"),
    # SlackDetector: https://hooks.slack.com/services/T.../B.../...
    ("slack_webhook", re.compile(r"https://hooks\.slack\.com/services/T[a-zA-Z0-9_]{1,16}"
                                 r"/B[a-zA-Z0-9_]{1,16}/[a-zA-Z0-9_]{1,8}", re.I),
     None, "A-Za-z0-9_"),
    # JwtTokenDetector: eyJ<header>.<payload>[.<signature>], the header must decode to JSON
    ("jwt", re.compile(r"eyJ[A-Za-z0-9_-]{4,120}={0,2}\.[A-Za-z0-9_-]"), _jwt_header_is_json,
     "A-Za-z0-9_.+/=-"),
    # PypiTokenDetector: pypi-AgEIcHlwaS5vcmc[A-Za-z0-9-_]{70,} (and the test index's)
    ("pypi_token", re.compile(r"pypi-(?:AgEIcHlwaS5vcmc|AgENdGVzdC5weXBpLm9yZw)[A-Za-z0-9_-]{8}"),
     None, _TOKEN_TAIL),
)

_ENTROPY_CLASS = "A-Za-z0-9+/=_-"
_entropy = Base64HighEntropyString().calculate_shannon_entropy


def entropy_threshold(length: int, slack: float = 0.45) -> float:
    """Shannon entropy (bits per character) a random alphanumeric string of ``length``
    characters has on average (4.56 at 32, 5.16 at 64, fitted to samples) minus ``slack``:
    with 0.45, 99 % of random keys pass, and long identifiers, words, UUIDs and hex digests
    (at most about 4 bits) do not."""
    return 4.56 + 0.6 * (math.log2(length) - 5) - slack


def high_entropy_matcher(action: Action | str = Action.REDACT, *, min_len: int = 32,
                         window: int = 64, slack: float = 0.45) -> RegexMatcher:
    """A run of base64/url-safe characters of at least ``min_len`` that starts where the run
    starts, has a digit and a letter, and whose first ``window`` characters look random
    (:func:`entropy_threshold`); the rest of a longer run is redacted too (extension)."""
    if not 16 <= min_len <= window:
        raise ValueError("high entropy: need 16 <= min_len <= window")

    def random_looking(text: str) -> bool:
        return (any(c.isdigit() for c in text) and any(c.isalpha() for c in text)
                and _entropy(text) >= entropy_threshold(len(text), slack))

    pattern = re.compile(f"(?<![{_ENTROPY_CLASS}])[{_ENTROPY_CLASS}]{{{min_len},{window}}}")
    return RegexMatcher("high_entropy", "secret", pattern, as_action(action),
                        validate=random_looking, extend=lambda: RunExtension(_ENTROPY_CLASS))


def private_key_matchers(action: Action | str = Action.REDACT) -> list[RegexMatcher]:
    """detect-secrets' private-key header patterns, with the dashes before them; the PEM body
    up to the END line is redacted with the header (PuTTY files: up to the first character
    that cannot be in one)."""
    out = []
    for pattern in PrivateKeyDetector.denylist:
        putty = pattern.pattern.startswith("PuTTY")
        out.append(RegexMatcher(
            "private_key", "secret", re.compile(f"-{{0,5}}(?:{pattern.pattern})", pattern.flags),
            as_action(action), extend=lambda putty=putty: PemExtension(header_line=not putty)))
    return out


def secret_matchers(action: Action | str = Action.REDACT, *, entropy: bool = True,
                    entropy_min_len: int = 32, entropy_slack: float = 0.45,
                    rules: Iterable[str] | None = None) -> list[RegexMatcher]:
    """All secret rules (or those named in ``rules``), specific ones first: where two match
    the same span, the first one's label is used."""
    action = as_action(action)
    out: list[RegexMatcher] = []
    for name, plugin in PLUGIN_RULES.items():
        for index, pattern in enumerate(plugin.denylist):
            span, _ = regex_bounds(pattern)
            if span > MAX_PLUGIN_SPAN:
                continue
            group = PATTERN_GROUPS.get((name, index), 0)
            out.append(RegexMatcher(PATTERN_NAMES.get((name, index), name), "secret",
                                    pattern, action, group=group))
    for name, pattern, validate, tail in BOUNDED_OVERRIDES:
        out.append(RegexMatcher(name, "secret", pattern, action, validate=validate,
                                extend=lambda tail=tail: RunExtension(tail)))
    out.extend(private_key_matchers(action))
    if entropy:
        out.append(high_entropy_matcher(action, min_len=entropy_min_len, slack=entropy_slack))
    if rules is not None:
        wanted = set(rules)
        unknown = wanted - {m.name for m in out} - ({"high_entropy"} if not entropy else set())
        if unknown:
            raise ValueError(f"unknown secret rules: {sorted(unknown)}")
        out = [m for m in out if m.name in wanted]
    return out


# -- PII ----------------------------------------------------------------------------------------

# local@domain.tld: the local part starts where a run of address characters starts (at most 64,
# RFC 5321), the domain ends with a 2-18 letter TLD that is not followed by more name characters.
# Letters are Unicode letters (internationalized addresses, RFC 6531).
EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]{1,64}@[^\W_][\w.-]{0,50}\.[^\W\d_]{2,18}(?![\w-])")


def _valid_email(text: str) -> bool:
    local, _, domain = text.partition("@")
    if local.startswith(".") or local.endswith(".") or ".." in local:
        return False
    labels = domain.split(".")
    return all(label and not label.startswith("-") and not label.endswith("-")
               for label in labels)


# +<country code> <number>: 8-15 digits (E.164) with at most two separator characters between
# digits; without separators at least 10 digits.
PHONE_INTL = re.compile(r"(?<![\w+])\+[0-9](?:[ .()-]{0,2}[0-9]){7,14}(?![\w])")
# North American: (555) 123-4567, 555-123-4567, 555.123.4567, 555 123 4567, 1-555-123-4567.
PHONE_NANP = re.compile(r"(?<![\w+.-])(?:1[ .-])?(?:\([0-9]{3}\) ?|[0-9]{3}[ .-])[0-9]{3}[ .-]"
                        r"[0-9]{4}(?![\w]|[.-][0-9])")


def _valid_intl_phone(text: str) -> bool:
    digits = sum(c.isdigit() for c in text)
    plain = digits == len(text) - 1
    return 10 <= digits <= 15 if plain else 8 <= digits <= 15


def _valid_nanp_phone(text: str) -> bool:
    body = text[2:] if text[:1] == "1" and text[1:2] in " .-" else text
    if body.startswith("("):
        return body[1] in "23456789"
    return body[0] in "23456789" and body[3] == body[7]    # one separator, used twice


# 13-19 digits, optionally grouped by spaces or dashes, not inside a longer number or word.
CARD = re.compile(r"(?<![\w.-])[0-9](?:[ -]?[0-9]){12,18}(?![\w-]|[.,][0-9])")
_CARD_GROUPS = {(4, 4, 4, 4), (4, 4, 4, 4, 3), (4, 4, 4, 4, 2), (4, 4, 4, 4, 1), (4, 6, 5),
                (4, 6, 4), (4, 4, 5), (4, 4, 4, 1), (4, 4, 4, 2), (4, 4, 4, 3)}
# Issuer prefixes (IIN ranges) with the lengths their cards have.
_IIN = (((4,), (13, 16, 19)),                                        # Visa
        (tuple(range(51, 56)) + tuple(range(2221, 2721)), (16,)),      # Mastercard
        ((34, 37), (15,)),                                            # American Express
        ((6011, 65) + tuple(range(644, 650)), (16, 17, 18, 19)),      # Discover
        ((35,), (16, 17, 18, 19)),                                    # JCB
        ((36, 38, 39) + tuple(range(300, 306)), (14, 15, 16, 17, 18, 19)),   # Diners
        ((62,), (16, 17, 18, 19)))                                    # UnionPay


def _valid_card(text: str) -> bool:
    digits = "".join(c for c in text if c.isdigit())
    separators = {c for c in text if not c.isdigit()}
    if len(separators) > 1:
        return False
    if separators:
        groups = tuple(len(g) for g in text.split(separators.pop()))
        if groups not in _CARD_GROUPS:
            return False
    if len(set(digits)) == 1:
        return False
    if not any(len(digits) in lengths and any(digits.startswith(str(p)) for p in prefixes)
               for prefixes, lengths in _IIN):
        return False
    return luhn.is_valid(digits)


PII_RULES = {   # kind -> (pattern, validator, a literal every match contains)
    "email": [(EMAIL, _valid_email, "@")],
    "phone": [(PHONE_INTL, _valid_intl_phone, "+"), (PHONE_NANP, _valid_nanp_phone, "")],
    "card": [(CARD, _valid_card, "")],
}


def pii_matchers(action: Action | str = Action.REDACT,
                 kinds: Iterable[str] = ("email", "phone", "card")) -> list[RegexMatcher]:
    action = as_action(action)
    out = []
    for kind in kinds:
        if kind not in PII_RULES:
            raise ValueError(f"unknown PII kind {kind!r} (known: {sorted(PII_RULES)})")
        for pattern, validate, required in PII_RULES[kind]:
            out.append(RegexMatcher(kind, "pii", pattern, action, validate=validate,
                                    required=required))
    return out
