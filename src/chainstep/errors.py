"""Errors meant for the user: the CLI prints them without a traceback."""


class ChainstepError(Exception):
    """A problem the user can fix; the message says what, where and how."""


class RecordError(ChainstepError):
    """A bad line in a records file; carries the file, line number and record id."""

    def __init__(self, path, line: int, message: str, record_id: str | None = None):
        where = f"{path}:{line}" + (f" (id {record_id})" if record_id else "")
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.record_id = path, line, record_id
