//! Offsets of CPython's internal structures, per version.
