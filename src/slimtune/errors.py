"""The one exception type users see: a single line naming the file/field/line at fault."""


class SlimtuneError(Exception):
    """A user-facing error. The CLI prints `error: <message>` on one line and exits with code 2.

    Messages name the file, field or line at fault, e.g.
    `data/train.jsonl:17: malformed JSON (Expecting ',' delimiter)`.
    They often quote user input (a field name, a label, a YAML problem): line breaks and other control
    characters in it are written as escapes (`\\n`), so the message stays one line whatever the input.
    """

    def __init__(self, message: object = "", *args: object):
        if isinstance(message, str) and not message.isprintable():
            message = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in message)
        super().__init__(message, *args)


class RunStopped(Exception):
    """Raised by a run's observer (`slimtune.run(..., on_eval=)`) to stop it, e.g. a search candidate that
    cannot meet its budget any more: the runner removes the run's output instead of keeping it to resume."""
