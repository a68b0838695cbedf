"""The one exception type the command line turns into a clean message and a non-zero exit."""


class PipelineError(Exception):
    """A problem the user can fix: bad input, a missing stage, a wrong option."""
