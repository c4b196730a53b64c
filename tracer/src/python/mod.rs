//! CPython, read from outside: the interpreter's data-structure offsets per version, its line tables, and
//! the frames of a traced process, so that an allocation is named by the Python `file:function:line` that made
//! it. Nothing is injected and nothing is installed in the target.

pub mod lines;
pub mod offsets;
pub mod runtime;
