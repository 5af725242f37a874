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


def validate_mapping(model, data, where: str):
    """`model.model_validate(data)` for a section parsed from YAML/JSON: data that is not a
    mapping, or that the model refuses, raises a one-line MoeRtError naming `where`."""
    from pydantic import ValidationError

    if not isinstance(data, dict):
        raise MoeRtError(f"{where}: must be a mapping, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise MoeRtError(f"{where}: {validation_detail(e)}") from None
