//! Flame graphs of live bytes by stack: Brendan Gregg's folded (collapsed) stacks, and the SVG the `inferno`
//! crate draws from them, Python frames in blue, native ones in warm colours.

use std::{
    collections::BTreeMap,
    hash::{DefaultHasher, Hash as _, Hasher as _},
    io::{self, Write},
};

use inferno::flamegraph::{
    self, Options,
    color::{Color, PaletteMap},
};

use super::{
    escape::{Escaped, xml},
    profile::{Profile, frame_name},
};

/// A frame's name as a folded line holds it: escaped like every target string, with its `;` (the frame
/// separator) written `\x3b` and the two characters XML refuses (U+FFFE, U+FFFF) escaped, so that no name can
/// split a stack or break the SVG.
fn folded_name(name: &str) -> String {
    Escaped(name)
        .to_string()
        .replace(';', "\\x3b")
        .replace('\u{fffe}', "\\u{fffe}")
        .replace('\u{ffff}', "\\u{ffff}")
}

/// Each distinct stack, outermost frame first, `;`-separated, with the live bytes it holds; sorted, and
/// stacks that hold nothing left out. Also says which frame names are Python's.
fn folded_stacks(profile: &Profile) -> (BTreeMap<String, u64>, BTreeMap<String, bool>) {
    let mut stacks: BTreeMap<String, u64> = BTreeMap::new();
    let mut python: BTreeMap<String, bool> = BTreeMap::new();
    for sample in profile.samples.iter().filter(|s| s.values.inuse_bytes > 0) {
        let names: Vec<String> = sample
            .frames
            .iter()
            .rev()
            .map(|f| {
                let name = folded_name(&frame_name(f));
                python.insert(name.clone(), f.is_python());
                name
            })
            .collect();
        let stack = if names.is_empty() {
            "(stack lost)".to_owned()
        } else {
            names.join(";")
        };
        *stacks.entry(stack).or_default() += sample.values.inuse_bytes;
    }
    (stacks, python)
}

/// `--format folded`: one line per stack, `outer;…;inner BYTES`.
pub fn write_folded(profile: &Profile, out: &mut dyn Write) -> io::Result<()> {
    for (stack, bytes) in folded_stacks(profile).0 {
        writeln!(out, "{stack} {bytes}")?;
    }
    Ok(())
}

/// A colour from a name's hash within a hue range: the same name always gets the same colour.
fn shade(name: &str, base: (u8, u8, u8), spread: (u8, u8, u8)) -> Color {
    let mut hasher = DefaultHasher::new();
    name.hash(&mut hasher);
    let h = hasher.finish();
    let vary = |base: u8, spread: u8, shift: u32| {
        base.saturating_add(((h >> shift) % (u64::from(spread) + 1)) as u8)
    };
    Color {
        r: vary(base.0, spread.0, 0),
        g: vary(base.1, spread.1, 16),
        b: vary(base.2, spread.2, 32),
    }
}

/// `--format flamegraph`: an interactive SVG (search, zoom), live bytes by stack.
pub fn write_svg(profile: &Profile, out: &mut dyn Write) -> io::Result<()> {
    let (stacks, python) = folded_stacks(profile);
    if stacks.is_empty() {
        return writeln!(
            out,
            r#"<?xml version="1.0" standalone="no"?><svg version="1.1" width="1200" height="60" xmlns="http://www.w3.org/2000/svg"><text x="600" y="35" text-anchor="middle" font-family="Verdana" font-size="14">{}: no live memory</text></svg>"#,
            xml(&profile.title)
        );
    }
    let mut palette = PaletteMap::default();
    for (name, is_python) in &python {
        let color = if *is_python {
            shade(name, (80, 130, 200), (40, 50, 55))
        } else {
            shade(name, (205, 90, 30), (50, 80, 30))
        };
        palette.insert(name, color);
    }
    let mut options = Options::default();
    options.title = Escaped(&profile.title).to_string();
    options.subtitle =
        Some("Width is live bytes. Python frames blue, native frames red to yellow.".to_owned());
    options.count_name = "bytes".to_owned();
    options.name_type = "Frame:".to_owned();
    options.palette_map = Some(&mut palette);
    let lines: Vec<String> = stacks
        .iter()
        .map(|(stack, bytes)| format!("{stack} {bytes}"))
        .collect();
    flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{output::profile::tests::sample_profile, procs::Frame};

    #[test]
    fn folded_stacks_are_outermost_first_with_live_bytes() {
        let mut out = Vec::new();
        write_folded(&sample_profile(), &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "libc.so.6+0x2724a;leak_site 100000\n\
             main;<module> (/app/etl.py:40);load (/app/etl.py:12);PyMem_Malloc 3000\n"
        );
    }

    #[test]
    fn same_stacks_are_summed_and_empty_ones_left_out() {
        let mut profile = sample_profile();
        let mut again = profile.samples[1].clone();
        again.values.inuse_bytes = 5;
        let mut nothing = profile.samples[0].clone();
        nothing.values.inuse_bytes = 0;
        profile.samples.extend([again, nothing]);
        profile.samples[0].frames.clear();
        let mut out = Vec::new();
        write_folded(&profile, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "(stack lost) 3000\nlibc.so.6+0x2724a;leak_site 100005\n"
        );
    }

    #[test]
    fn hostile_names_cannot_split_a_stack_or_break_the_svg() {
        let mut profile = sample_profile();
        profile.title = "<title>&\"'\u{1b}[31m".to_owned();
        profile.samples[0].frames[1] = Frame::python(
            "a;b\n</text><script>alert(1)</script>&amp;\u{ffff}".to_owned(),
            "x\"y'.py".to_owned(),
            Some(1),
        );
        let mut folded = Vec::new();
        write_folded(&profile, &mut folded).unwrap();
        let folded = String::from_utf8(folded).unwrap();
        assert_eq!(folded.lines().count(), 2, "{folded}");
        assert!(folded.contains("a\\x3bb\\n</text>"), "{folded}");
        let mut svg = Vec::new();
        write_svg(&profile, &mut svg).unwrap();
        let svg = String::from_utf8(svg).unwrap();
        assert!(!svg.contains("<script>alert"), "{svg}");
        assert!(!svg.contains('\u{1b}') && !svg.contains('\u{ffff}'));
        assert!(svg.contains("&lt;/text&gt;&lt;script&gt;"), "{svg}");
        assert!(svg.contains("leak_site"));
    }

    #[test]
    fn python_and_native_frames_get_distinct_colours() {
        let mut svg = Vec::new();
        write_svg(&sample_profile(), &mut svg).unwrap();
        let svg = String::from_utf8(svg).unwrap();
        // Each frame is a <g> with its <title>, then its rect's fill.
        let fill_of = |name: &str| -> (u8, u8, u8) {
            let at = svg.find(&format!("<title>{name}")).expect(name);
            let rest = &svg[at..];
            let fill = &rest[rest.find("fill=\"rgb(").unwrap() + 10..];
            let parts: Vec<u8> = fill[..fill.find(')').unwrap()]
                .split(',')
                .map(|p| p.trim().parse().unwrap())
                .collect();
            (parts[0], parts[1], parts[2])
        };
        let python = fill_of("load (/app/etl.py:12)");
        let native = fill_of("leak_site");
        assert!(python.2 > python.0, "Python frames are blue: {python:?}");
        assert!(native.0 > native.2, "native frames are warm: {native:?}");
    }

    #[test]
    fn an_empty_profile_still_draws_a_document() {
        let mut profile = sample_profile();
        profile.samples.clear();
        let mut svg = Vec::new();
        write_svg(&profile, &mut svg).unwrap();
        let svg = String::from_utf8(svg).unwrap();
        assert!(svg.contains("test: no live memory</text></svg>"), "{svg}");
    }
}
