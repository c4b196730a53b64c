//! Empty on purpose: the programs live in the `tracer` binary target (`main.rs`). This library target exists so
//! that `tracer` can name this crate as a build dependency, which makes cargo rebuild it when the programs change.
#![no_std]
