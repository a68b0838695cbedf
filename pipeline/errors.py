"""The one exception type the command line turns into a clean message and a non-zero exit."""


class PipelineError(Exception):
    """A problem the user can fix: bad input, a missing stage, a wrong option."""


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C after which rerunning the same command is the wrong way on (an upload would be sent
    twice): its text, "while ...: ...", says what was done and what to do instead."""
