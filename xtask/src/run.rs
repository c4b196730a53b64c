//! `cargo xtask run [-- ARGS]`: build, then run `alloctrace ARGS` as root. Without ARGS it traces the bundled
//! demo, a Python task shaped like the leaks data engineers hit, and prints the `leaks` report.

use std::{ffi::OsString, path::Path};

use anyhow::bail;

use crate::{as_root, build, check, root};

/// The interpreter the demo runs on: Debian's, present on every machine of this kind.
const DEMO_PYTHON: &str = "/usr/bin/python3";

pub fn run(args: Vec<OsString>) -> anyhow::Result<()> {
    let alloctrace = build::run()?;
    let args = if args.is_empty() {
        if !Path::new(DEMO_PYTHON).exists() {
            bail!("the demo runs on {DEMO_PYTHON}, which is missing: apt-get install python3");
        }
        let demo = root().join("tracer/demo/etl_task.py");
        ["leaks", "--duration", "5s", "--top", "5", "--"]
            .iter()
            .map(OsString::from)
            .chain([DEMO_PYTHON.into(), demo.into_os_string()])
            .collect()
    } else {
        args
    };
    check(as_root(alloctrace)?.args(args))
}
