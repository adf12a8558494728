"""Bounce classes (engine.scheduler.bounces): real replies of the large providers, as their
published error pages and postmaster sites print them, and the defaults of Postfix, Exim
and Ferry's own client → the category each must get."""

from __future__ import annotations

import pytest

from engine.config import BOUNCE_CATEGORIES, BounceRuleConfig
from engine.scheduler import bounces
from engine.scheduler.bounces import ENHANCED, SUBJECTS, TEXTS, Classifier

REPLIES: list[tuple[str, str]] = [
    # Gmail (support.google.com/a/answer/3726730, "SMTP error reference")
    ("550-5.1.1 The email account that you tried to reach does not exist. Please try "
     "double-checking the recipient's email address for typos", "bad-mailbox"),
    ("550-5.2.1 The email account that you tried to reach is disabled.", "inactive"),
    ("452-4.2.2 The email account that you tried to reach is over quota.", "quota"),
    ("552-5.2.2 The email account that you tried to reach is over quota and inactive.",
     "quota"),
    ("450-4.2.1 The user you are trying to contact is receiving mail at a rate that "
     "prevents additional messages from being delivered.", "quota"),
    ("552-5.3.4 Your message exceeded Google's message size limits.", "too-large"),
    ("550-5.7.1 [192.0.2.1] Our system has detected that this message is likely "
     "unsolicited mail. To reduce the amount of spam sent to Gmail, this message has "
     "been blocked.", "content"),
    ("552-5.7.0 This message was blocked because its content presents a potential "
     "security issue.", "content"),
    ("421-4.7.28 Our system has detected an unusual rate of unsolicited mail "
     "originating from your IP address.", "policy"),
    ("550-5.7.26 This mail has been blocked because the sender is unauthenticated. "
     "Gmail requires all senders to authenticate with either SPF or DKIM.", "policy"),
    ("550-5.7.25 The IP address sending this message does not have a PTR record setup.",
     "policy"),
    ("550-5.7.1 Our system has detected that this message is likely suspicious due to "
     "the very low reputation of the sending domain.", "policy"),
    ("550-5.7.1 The user or domain that you are sending to (or from) has a policy that "
     "prohibits the mail that you sent.", "policy"),
    ("554-5.7.5 Permanent error evaluating DMARC policy", "policy"),
    ("530-5.7.0 Must issue a STARTTLS command first.", "tls"),
    # Microsoft 365 / Outlook.com (learn.microsoft.com: NDRs in Exchange Online;
    # sendersupport.olc.protection.outlook.com)
    ("550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address "
     "lookup", "bad-mailbox"),
    ("550 5.1.1 RESOLVER.ADR.RecipNotFound; not found", "bad-mailbox"),
    ("550 5.4.1 Recipient address rejected: Access denied. AS(201806281)", "bad-mailbox"),
    ("550 5.5.0 Requested action not taken: mailbox unavailable (S2017062302)",
     "bad-mailbox"),
    ("550 5.7.1 Service unavailable, Client host [192.0.2.1] blocked using Spamhaus. To "
     "request removal from this list see https://www.spamhaus.org/query/ip/192.0.2.1",
     "policy"),
    ("550 5.7.708 Service unavailable. Access denied, traffic not accepted from this IP.",
     "policy"),
    ("550 5.7.509 Access denied, sending domain example.com does not pass DMARC "
     "verification and has a DMARC policy of reject.", "policy"),
    ("451 4.7.500 Server busy. Please try again later from [192.0.2.1]. (AS761)", "policy"),
    ("554 5.2.2 mailbox full; STOREDRV.Deliver.Exception:QuotaExceededException", "quota"),
    ("550 5.3.4 ROUTING.SizeLimit; message size exceeds fixed maximum message size",
     "too-large"),
    ("554 5.4.14 Hop count exceeded - possible mail loop ATTR34", "routing"),
    ("550 5.7.350 Remote server returned message detected as spam", "content"),
    ("421 4.3.2 The maximum number of concurrent server connections has exceeded a "
     "limit, closing transmission channel", "routing"),
    # Yahoo / AOL (senders.yahooinc.com/smtp-error-codes)
    ("421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected "
     "volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/"
     "error-codes", "policy"),
    ("553 5.7.2 [TSS09] All messages from 192.0.2.1 will be permanently deferred; "
     "Retrying will NOT succeed.", "policy"),
    ("554 5.7.9 Message not accepted for policy reasons.  See https://postmaster."
     "yahooinc.com/error-codes", "policy"),
    ("552 1 Requested mail action aborted, mailbox not found", "bad-mailbox"),
    ("554 delivery error: dd This user doesn't have a yahoo.com account "
     "(someone@yahoo.com) [0] - mta1234.mail.bf1.yahoo.com", "bad-mailbox"),
    ("554 delivery error: dd Sorry your message to someone@yahoo.com cannot be delivered. "
     "This mailbox is disabled (554.30). - mta1234.mail.ne1.yahoo.com", "inactive"),
    ("421 4.7.0 [TS01] Messages from 192.0.2.1 temporarily deferred due to user "
     "complaints", "policy"),
    # Apple iCloud (support.apple.com: iCloud Mail postmaster)
    ("550 5.1.1 <someone@icloud.com>: user does not exist", "bad-mailbox"),
    ("552 5.2.2 <someone@icloud.com>: user is over quota", "quota"),
    ("554 5.7.1 [CS01] Message rejected due to local policy. Please visit "
     "https://support.apple.com/en-us/HT204137", "policy"),
    # GMX / web.de (postmaster.gmx.net, postmaster.web.de)
    ("550 Requested action not taken: mailbox unavailable", "bad-mailbox"),
    ("554-Transaction failed 554-Reject due to policy restrictions. 554 For explanation "
     "visit https://www.gmx.net/mail/senderguidelines?c=pi", "policy"),
    ("552 Requested mail action aborted: exceeded storage allocation", "quota"),
    # Orange (postmaster.orange.fr)
    ("550 5.1.1 Adresse d au moins un destinataire invalide. Invalid recipient. OFR_416",
     "bad-mailbox"),
    ("421 mwinf5c10 ME Service refuse. Veuillez essayer plus tard. Service refused, "
     "please try later. OFR004_104 [104]", "policy"),
    # Comcast / Xfinity (postmaster.comcast.net)
    ("550 5.1.1 <someone@comcast.net> Not our Customer", "bad-mailbox"),
    ("554 5.7.1 Comcast block for spam. Please see http://postmaster.comcast.net/"
     "smtp-error-codes.php#BL000000", "content"),
    ("421 4.7.0 Too many sessions opened. Please see http://postmaster.comcast.net/"
     "smtp-error-codes.php#RL000001", "policy"),
    # Postfix defaults
    ("550 5.1.1 <nobody@example.com>: Recipient address rejected: User unknown in "
     "virtual mailbox table", "bad-mailbox"),
    ("450 4.1.2 <a@nowhere.example>: Recipient address rejected: Domain not found",
     "bad-domain"),
    ("554 5.7.1 <a@example.org>: Relay access denied", "policy"),
    ("552 5.3.4 Message size exceeds fixed limit", "too-large"),
    ("554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using "
     "zen.spamhaus.org", "policy"),
    ("450 4.7.1 Client host rejected: cannot find your hostname, [192.0.2.1]", "policy"),
    ("452 4.3.1 Insufficient system storage", "other"),
    ("421 4.4.2 mx.example.com Error: timeout exceeded", "routing"),
    # Exim defaults
    ("550 Unrouteable address", "bad-mailbox"),
    ("550 No Such User Here", "bad-mailbox"),
    ("552 Message size exceeds maximum permitted", "too-large"),
    ("550 Administrative prohibition", "policy"),
    ("550-Verification failed for <a@example.com>", "policy"),
    # Ferry's own replies and routing reasons (engine.client.smtp, engine.routing.mx)
    ("451 4.4.1 Connection to 192.0.2.1:25 failed: Connection refused", "routing"),
    ("451 4.4.2 Timeout waiting for the RCPT reply from mx.example.com", "routing"),
    ("451 4.4.3 DNS lookup for example.com failed temporarily (SERVFAIL)", "dns"),
    ("550 5.1.10 example.com does not accept mail: it has a null MX (RFC 7505)",
     "bad-domain"),
    ("550 5.4.4 no MX host of example.com has an address (mx.example.com)", "bad-domain"),
    ("550 5.1.2 exa_mple.com is not a valid domain name (LabelTooLong)", "bad-domain"),
    ("451 4.7.5 TLS handshake with mx.example.com failed: certificate verify failed",
     "tls"),
    ("451 4.7.10 mx.example.com does not offer STARTTLS", "tls"),
    ("451 4.5.0 mx.example.com: unexpected reply", "protocol"),
    ("451 4.4.1 mx.example.com is down, not tried", "routing"),
    ("451 4.3.0 local error in delivery", "other"),
    ("message expired in the queue; last reply: 451 4.4.1 Connection refused", "expired"),
    # codes alone
    ("550 go away", "bad-mailbox"),
    ("554 Transaction failed", "other"),
    ("500 5.5.1 Command unrecognized", "protocol"),
    ("", "other"),
]


@pytest.mark.parametrize(("reply", "category"), REPLIES, ids=[r[:40] for r, _ in REPLIES])
def test_provider_replies(reply: str, category: str) -> None:
    assert Classifier().classify(reply) == category


def test_the_table_names_only_categories() -> None:
    named = ({c for c, _ in ENHANCED.values()} | set(SUBJECTS.values())
             | {c for c, _ in TEXTS} | set(bounces.CODES.values()))
    assert named <= set(BOUNCE_CATEGORIES)


def test_operator_rules_come_first_and_need_every_condition() -> None:
    classifier = Classifier([
        BounceRuleConfig(category="quota", code=550, text=r"mailbox unavailable"),
        BounceRuleConfig(category="content", enhanced="5.7"),
    ])
    assert classifier.classify("550 Requested action not taken: mailbox unavailable") == (
        "quota")
    assert classifier.classify("551 mailbox unavailable") == "bad-mailbox"  # not 550
    assert classifier.classify("550 5.7.26 DMARC") == "content"  # "5.7" is a prefix...
    assert classifier.classify("550 5.71.1 odd") == "other"  # ...of whole numbers only
    assert classifier.classify("550 5.1.1 no such user") == "bad-mailbox"


def test_configure_sets_the_process_table() -> None:
    try:
        bounces.configure([BounceRuleConfig(category="other", text="no such user")])
        assert bounces.classify("550 5.1.1 no such user") == "other"
    finally:
        bounces.configure([])
    assert bounces.classify("550 5.1.1 no such user") == "bad-mailbox"
