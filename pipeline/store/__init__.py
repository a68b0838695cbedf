"""The project's files: their formats and names, the freshness rule ("is this output current"), the
run records, the submission ledger, the project lock and the built-in sample."""
