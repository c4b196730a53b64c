//! Builds the eBPF programs (`tracer-ebpf`, on nightly for the BPF target) so that the `alloctrace` binary
//! embeds them: a plain `cargo build` is complete.

fn main() -> anyhow::Result<()> {
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tracer-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tracer-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
