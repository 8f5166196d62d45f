"""The one exception type users see: a single line naming the file/field/line at fault."""


class SlimtuneError(Exception):
    """A user-facing error. The CLI prints `error: <message>` on one line and exits with code 2.

    Messages name the file, field or line at fault, e.g.
    `data/train.jsonl:17: malformed JSON (Expecting ',' delimiter)`.
    """
