"""User-facing errors.

Anything a user can cause (bad model folder, bad config, bad trace, bad flag) raises MoeRtError
with a one-line message. The CLI prints it as `moe-rt: error: <message>` and exits 2; the server
turns it into a 4xx. Anything else is a bug and keeps its traceback.
"""


class MoeRtError(Exception):
    """A problem with the user's input, stated in one line."""


def validation_detail(e) -> str:
    """The first problem of a pydantic ValidationError as 'field.path: message', one line."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg
