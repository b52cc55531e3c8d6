"""Events out: the durable event journal, signed webhooks, open and click tracking.

Every delivery outcome, feedback outcome, open and click becomes one *event record*, appended
to the journal ``state_dir/events/journal/SEQ.jsonl`` (one JSON object a line, UTF-8) and
fsynced before it counts as emitted; the queue manager waits for that fsync before it writes
a recipient's new state, so a crash at any instant loses no event (a crash between the two
can repeat one, with a new ``event_id``: duplicates, never losses). Readers (the webhook
senders, the time series) follow the journal by sequence number.

The record format (stable; readers must ignore fields they do not know):

``seq``          int, position in the journal (1, 2, ...; never reused)
``event_id``     str, 32 hex digits, unique, stable across webhook retries (de-duplicate on it)
``type``         "delivered" | "deferred" | "bounced" | "expired" | "relayed" | "complaint" |
                 "unsubscribe" | "reply" | "open" | "click" | "received"
``time``         str, ISO 8601 UTC with milliseconds ("2026-12-02T08:30:00.123+00:00")
``qid``          str | null, the queue id the event is about
``recipient``    str | null
``sender``       str | null, the envelope sender ("" for bounces)
``campaign``, ``tenant``, ``pool``, ``source``, ``provider``   str | null (from injection / relay)
``metadata``     object | null, the recipient's metadata given at injection
``reply``        {"code": int, "enhanced": str, "text": str} | null, the remote (or local) reply
``enhanced``     str | null, the reply's RFC 3463 code, repeated for convenience
``mx``           str | null, the host that answered
``attempt``      int | null, delivery attempts so far
``bounce``       {"reason": str, "class": "hard" | "soft"} | null (bounced, expired, deferred)
``feedback``     str | null, for complaint/unsubscribe/reply: the report kind ("arf", "dsn", ...)
``url``          str, for ``click``: the original URL
``machine``      bool, for ``open``/``click``: fetched by a known proxy or scanner, not a person
``user_agent``   str, for ``open``/``click``
Fields that do not apply are left out (readers treat a missing field as null).

A webhook POST carries a JSON array of these records (``batch_size`` > 1) or one object
(``batch_size`` = 1), with ``X-Pymta-Signature: t=UNIX,v1=HEX`` (HMAC-SHA256 of
``t + "." + body`` with the endpoint's secret) and ``X-Pymta-Event-Count``.
"""

EVENT_TYPES = (
    "delivered", "deferred", "bounced", "expired", "relayed", "complaint", "unsubscribe", "reply", "open", "click",
    "received",
)  # fmt: skip
