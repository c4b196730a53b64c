//! `--format html`: one self-contained page (nothing is fetched when it is viewed): the summary, a chart of
//! each process's live memory over the trace, the interactive flame graph, and the sites with their verdicts.
//!
//! Written by hand, with no templating or plotting crate: the page is one fixed layout of a few dozen lines,
//! and the chart is axes, ticks and a polyline per process. A template engine (askama, minijinja) or a
//! plotting crate (plotters' SVG backend) would add build-time code and a second escaping scheme to check,
//! where here every string from a target goes through one function, [`xml`], which escapes it both for the
//! markup and for a terminal that shows the file.

use std::io::{self, Write};

use super::{
    escape::xml,
    flamegraph,
    profile::{Profile, frame_name},
    text::bytes,
};

/// Sites listed in the table, most live bytes first.
const TABLE_ROWS: usize = 100;

const STYLE: &str = "body{font-family:Verdana,sans-serif;margin:24px;color:#222;max-width:1300px}\
h1{font-size:20px}h2{font-size:16px;margin-top:28px}ul{padding-left:20px}\
table{border-collapse:collapse;font-size:13px}th,td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left}\
td.n{text-align:right;font-variant-numeric:tabular-nums}.leak{color:#b00;font-weight:bold}\
.lingering{color:#a60}.churn{color:#06a}.steady{color:#080}code{font-size:12px}";

/// Line colours of the chart, one per process in turn.
const COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

/// The page.
pub fn write(profile: &Profile, out: &mut dyn Write) -> io::Result<()> {
    let totals = profile.totals();
    writeln!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>",
        xml(&profile.title)
    )?;
    writeln!(out, "<h1>{}</h1>\n<ul>", xml(&profile.title))?;
    for line in &profile.summary {
        writeln!(out, "<li>{}</li>", xml(line))?;
    }
    writeln!(
        out,
        "<li>{} live in {} blocks{}</li>\n</ul>",
        bytes(totals.inuse_bytes),
        totals.inuse_objects,
        if profile.alloc_known {
            format!(
                "; {} allocated in {} calls",
                bytes(totals.alloc_bytes),
                totals.alloc_objects
            )
        } else {
            String::new()
        }
    )?;
    writeln!(out, "<h2>Live memory over time</h2>")?;
    chart(profile, out)?;
    writeln!(out, "<h2>Flame graph of live bytes</h2>")?;
    let mut svg = Vec::new();
    flamegraph::write_svg(profile, &mut svg)?;
    // A document of its own, so that its script and ids cannot meet the page's; a data URL, so that nothing is
    // fetched. Percent-encoded: `&` and `"` would end or change the attribute, `%` and `#` the URL, and a URL
    // loses its newlines, which the flame graph's script needs.
    let (width, height) = size(&svg);
    write!(
        out,
        "<object type=\"image/svg+xml\" width=\"{width}\" height=\"{height}\" data=\"data:image/svg+xml;charset=utf-8,"
    )?;
    for &byte in &svg {
        match byte {
            b'%' | b'#' | b'"' | b'&' | b'<' | b'>' | b'\'' | b'\n' | b'\r' | b'\t' => {
                write!(out, "%{byte:02X}")?
            }
            _ => out.write_all(&[byte])?,
        }
    }
    writeln!(out, "\">flame graph</object>")?;
    table(profile, out)?;
    writeln!(out, "</body></html>")
}

/// The `width` and `height` of an SVG document's root element (an object shows 300 by 150 otherwise).
fn size(svg: &[u8]) -> (u32, u32) {
    let text = String::from_utf8_lossy(svg);
    let root = text.find("<svg ").map_or("", |at| &text[at..]);
    let root = &root[..root.find('>').unwrap_or(root.len())];
    let attribute = |name: &str| -> Option<u32> {
        let value = &root[root.find(&format!(" {name}=\""))? + name.len() + 3..];
        value[..value.find('"')?].parse().ok()
    };
    (
        attribute("width").unwrap_or(1200),
        attribute("height").unwrap_or(600),
    )
}

/// Round numbers for an axis: a step of 1, 2 or 5 times a power of ten (of 1024 for bytes), about `ticks` of
/// them up to `max`.
fn step(max: f64, ticks: f64, base: f64) -> f64 {
    let raw = (max / ticks).max(f64::MIN_POSITIVE);
    let power = base.powf(raw.log(base).floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * power)
}

/// An inline SVG line chart: seconds across, live bytes up, a line per process.
fn chart(profile: &Profile, out: &mut dyn Write) -> io::Result<()> {
    let points = profile.series.iter().flat_map(|s| s.points.iter());
    let (max_s, max_bytes) = points.fold((0.0f64, 0u64), |(t, b), &(s, bytes)| {
        (t.max(s), b.max(bytes))
    });
    if profile.series.iter().all(|s| s.points.is_empty()) {
        return writeln!(out, "<p>No samples of live memory were taken.</p>");
    }
    let (width, height, left, bottom, top, right) = (960.0, 320.0, 90.0, 40.0, 20.0, 20.0);
    let t_step = step(max_s.max(1.0), 8.0, 10.0);
    let t_max = (max_s / t_step).ceil().max(1.0) * t_step;
    let b_step = step((max_bytes as f64).max(1024.0), 5.0, 2.0);
    let b_max = (max_bytes as f64 / b_step).ceil().max(1.0) * b_step;
    let x = |s: f64| left + s / t_max * (width - left - right);
    let y = |b: f64| height - bottom - b / b_max * (height - top - bottom);
    writeln!(
        out,
        "<svg id=\"memory-chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{}\" font-family=\"Verdana\" font-size=\"11\">",
        height + 20.0 * profile.series.len() as f64
    )?;
    for i in 0..=(t_max / t_step).round() as u32 {
        let t = f64::from(i) * t_step;
        writeln!(
            out,
            "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{top}\" y2=\"{1}\" stroke=\"#eee\"/><text x=\"{0:.1}\" y=\"{2}\" text-anchor=\"middle\">{3} s</text>",
            x(t),
            height - bottom,
            height - bottom + 16.0,
            (t * 1000.0).round() / 1000.0
        )?;
    }
    for i in 0..=(b_max / b_step).round() as u32 {
        let b = f64::from(i) * b_step;
        writeln!(
            out,
            "<line x1=\"{left}\" x2=\"{0}\" y1=\"{1:.1}\" y2=\"{1:.1}\" stroke=\"#eee\"/><text x=\"{2}\" y=\"{3:.1}\" text-anchor=\"end\">{4}</text>",
            width - right,
            y(b),
            left - 6.0,
            y(b) + 4.0,
            bytes(b as u64)
        )?;
    }
    writeln!(
        out,
        "<line x1=\"{left}\" x2=\"{left}\" y1=\"{top}\" y2=\"{0}\" stroke=\"#444\"/><line x1=\"{left}\" x2=\"{1}\" y1=\"{0}\" y2=\"{0}\" stroke=\"#444\"/>",
        height - bottom,
        width - right
    )?;
    for (i, series) in profile.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let coordinates: Vec<String> = series
            .points
            .iter()
            .map(|&(s, b)| format!("{:.1},{:.1}", x(s), y(b as f64)))
            .collect();
        writeln!(
            out,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
            coordinates.join(" ")
        )?;
        for c in &coordinates {
            let (cx, cy) = c.split_once(',').unwrap_or(("0", "0"));
            writeln!(
                out,
                "<circle cx=\"{cx}\" cy=\"{cy}\" r=\"2.5\" fill=\"{colour}\"/>"
            )?;
        }
        let last = series.points.last().map_or(0, |p| p.1);
        let container = series
            .container
            .as_ref()
            .map_or_else(String::new, |c| format!(" in {c}"));
        writeln!(
            out,
            "<rect x=\"{left}\" y=\"{0}\" width=\"14\" height=\"4\" fill=\"{colour}\"/><text x=\"{1}\" y=\"{2}\">pid {3} {4}{5}: {6} live at the end</text>",
            height + 20.0 * i as f64 - 2.0,
            left + 20.0,
            height + 20.0 * i as f64 + 2.0,
            series.pid,
            xml(&series.comm),
            xml(&container),
            bytes(last)
        )?;
    }
    writeln!(out, "</svg>")
}

/// The sites, most live bytes first, with their verdicts and where they allocate.
fn table(profile: &Profile, out: &mut dyn Write) -> io::Result<()> {
    let mut samples: Vec<_> = profile.samples.iter().collect();
    samples.sort_by_key(|s| std::cmp::Reverse(s.values.inuse_bytes));
    writeln!(
        out,
        "<h2>Sites</h2>\n<table id=\"sites\"><tr><th>#</th><th>live</th><th>blocks</th><th>allocated</th><th>calls</th><th>kind</th><th>verdict</th><th>process</th><th>where</th></tr>"
    )?;
    for (rank, s) in samples.iter().take(TABLE_ROWS).enumerate() {
        let (verdict, reason) = s
            .verdict
            .as_ref()
            .map_or(("", ""), |(v, reason)| (v.name(), reason.as_str()));
        // The innermost Python frame says where in the program; native frames where in the interpreter.
        let place = s
            .frames
            .iter()
            .find(|f| f.is_python())
            .or(s.frames.first())
            .map_or_else(|| "(stack lost)".to_owned(), frame_name);
        // One frame a line in the tooltip.
        let stack: Vec<String> = s.frames.iter().map(|f| xml(&frame_name(f))).collect();
        writeln!(
            out,
            "<tr><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td><td class=\"{verdict}\" title=\"{}\">{verdict}</td><td>{} {}</td><td title=\"{}\"><code>{}</code></td></tr>",
            rank + 1,
            bytes(s.values.inuse_bytes),
            s.values.inuse_objects,
            if profile.alloc_known {
                bytes(s.values.alloc_bytes)
            } else {
                String::new()
            },
            if profile.alloc_known {
                s.values.alloc_objects.to_string()
            } else {
                String::new()
            },
            xml(s.labels.kind),
            xml(reason),
            s.labels.pid,
            xml(&s.labels.comm),
            stack.join("&#10;"),
            xml(&place),
        )?;
    }
    writeln!(out, "</table>")?;
    if samples.len() > TABLE_ROWS {
        writeln!(
            out,
            "<p>{} more sites not listed.</p>",
            samples.len() - TABLE_ROWS
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{output::profile::tests::sample_profile, procs::Frame};

    fn page(profile: &Profile) -> String {
        let mut out = Vec::new();
        write(profile, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_page_holds_summary_chart_flame_graph_and_sites() {
        let html = page(&sample_profile());
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.contains("<li>traced for 2.0 s</li>"), "{html}");
        assert!(html.contains("<svg id=\"memory-chart\""), "{html}");
        assert!(html.contains("<polyline"), "{html}");
        assert!(
            html.contains("pid 10 python3: 2.9 KiB live at the end"),
            "{html}"
        );
        assert!(
            html.contains("data:image/svg+xml;charset=utf-8,%3C?xml"),
            "{html}"
        );
        assert!(
            html.contains("<td class=\"leak\" title=\"it grows\">leak</td>"),
            "{html}"
        );
        assert!(
            html.contains("<code>load (/app/etl.py:12)</code>"),
            "{html}"
        );
        // Nothing is fetched: no source, stylesheet or import, and no link to an address (namespace names and
        // comments are not fetched), in the page or in the flame graph's encoded document.
        for fetch in [
            "src=",
            "<link",
            "@import",
            "href=\"http",
            "href=%22http",
            "url(http",
            "url(%22http",
        ] {
            assert!(!html.contains(fetch), "{fetch}");
        }
    }

    #[test]
    fn hostile_names_stay_text() {
        let mut profile = sample_profile();
        profile.title = "</title><script>alert(1)</script>".to_owned();
        profile.samples[0].frames[1] = Frame::python(
            "\"><img onerror=x>".to_owned(),
            "a&b.py".to_owned(),
            Some(1),
        );
        profile.series[0].comm = "<b>\u{1b}[2J".to_owned();
        let html = page(&profile);
        assert!(!html.contains("<script>"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(!html.contains("<b>"), "{html}");
        assert!(!html.contains('\u{1b}'));
        assert!(html.contains("&lt;/title&gt;&lt;script&gt;"), "{html}");
        assert!(
            html.contains("&quot;&gt;&lt;img onerror=x&gt; (a&amp;b.py:1)"),
            "{html}"
        );
    }

    #[test]
    fn the_flame_graph_is_shown_at_its_own_size() {
        assert_eq!(
            size(b"<?xml?><svg version=\"1.1\" width=\"1200\" height=\"158\" onload=\"init(evt)\"><rect width=\"5\"/></svg>"),
            (1200, 158)
        );
        assert_eq!(size(b"nothing"), (1200, 600));
    }

    #[test]
    fn axis_steps_are_round() {
        assert_eq!(step(10.0, 8.0, 10.0), 2.0);
        assert_eq!(step(100.0, 8.0, 10.0), 20.0);
        assert_eq!(step(3.0, 8.0, 10.0), 0.5);
        assert_eq!(
            step(10.0 * 1024.0 * 1024.0, 5.0, 2.0),
            2.0 * 1024.0 * 1024.0
        );
        assert_eq!(step(3000.0, 5.0, 2.0), 1024.0);
    }
}
