//! CPython line tables: instruction offset → source line, for every supported version.
