//! Escaping of the strings a target controls (its names, arguments, paths, symbols, Python code names,
//! container and Airflow names) before a terminal shows them: none of their control characters reaches a
//! terminal, and none of their newlines can forge a line of a report.

use std::fmt::{self, Write as _};

/// Shows a target's string the way `ls -b` does: control characters (C0, DEL and C1), the characters that
/// reorder or hide text (bidirectional controls, zero-width characters, line separators) and the backslash
/// as escapes (`\n`, `\t`, `\r`, `\x1b`, `\u{202e}`, `\\`), everything else as it is. The backslash is
/// escaped so that an escape in the output always stands for the character, never for the text itself.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut plain = 0;
        for (at, c) in self.0.char_indices() {
            if !needs_escape(c) {
                continue;
            }
            f.write_str(&self.0[plain..at])?;
            plain = at + c.len_utf8();
            match c {
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                '\t' => f.write_str("\\t")?,
                '\r' => f.write_str("\\r")?,
                c if u32::from(c) <= 0xff => write!(f, "\\x{:02x}", u32::from(c))?,
                c => write!(f, "\\u{{{:04x}}}", u32::from(c))?,
            }
        }
        f.write_str(&self.0[plain..])
    }
}

/// `text`, escaped: for a place that needs a `String`.
pub fn escaped(text: &str) -> String {
    Escaped(text).to_string()
}

/// `text` for XML and HTML, as text or inside a quoted attribute: escaped as [`Escaped`] does (so no control
/// character, which XML refuses, is left), then `&`, `<`, `>`, `"` and `'` as entities, and the two
/// non-characters XML refuses (U+FFFE, U+FFFF) as escapes.
pub fn xml(text: &str) -> String {
    let escaped = escaped(text);
    let mut out = String::with_capacity(escaped.len());
    for c in escaped.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\u{fffe}' | '\u{ffff}' => {
                let _ = write!(out, "\\u{{{:04x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

fn needs_escape(c: char) -> bool {
    c == '\\' || c.is_control() || hides_text(c)
}

/// Characters a terminal prints as nothing, or that reorder the text around them: with them a name can look
/// like another, or a line like another line.
fn hides_text(c: char) -> bool {
    matches!(
        c,
        '\u{00ad}'
            | '\u{061c}'
            | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{2069}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}'
    )
}

/// A JSON document with the characters JSON allows raw in strings but a terminal acts on (DEL, C1 controls)
/// or that hide text, escaped as `\uXXXX`; serde_json already escapes the C0 controls. Outside strings JSON
/// is ASCII without DEL, so every character replaced here is inside a string, where the escape reads back
/// as the same character.
pub fn json_for_terminal(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c == '\u{7f}' || (!c.is_ascii() && needs_escape(c)) {
            // Characters outside the Basic Multilingual Plane are never escaped here.
            let _ = write!(out, "\\u{:04x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_text_is_escaped_for_markup_and_terminals() {
        assert_eq!(
            xml("a<b>&\"c\"'d'\n\u{1b}\u{ffff}\\"),
            "a&lt;b&gt;&amp;&quot;c&quot;&#39;d&#39;\\n\\x1b\\u{ffff}\\\\"
        );
        assert_eq!(xml("plain é"), "plain é");
    }

    /// Whether `text` holds a byte a terminal acts on: any control but the newline.
    fn has_control(text: &str) -> bool {
        text.chars().any(|c| c != '\n' && c.is_control())
    }

    #[test]
    fn a_screen_clear_is_shown_not_run() {
        assert_eq!(escaped("a\x1b[2Jb"), "a\\x1b[2Jb");
    }

    #[test]
    fn a_window_title_change_is_shown_not_run() {
        assert_eq!(escaped("\x1b]0;owned\x07"), "\\x1b]0;owned\\x07");
    }

    #[test]
    fn a_forged_traceback_line_stays_on_its_own_line() {
        let forged = "app.py\"\n  File \"/etc/shadow\", line 1";
        let shown = escaped(forged);
        assert_eq!(shown, "app.py\"\\n  File \"/etc/shadow\", line 1");
        assert!(!shown.contains('\n'));
    }

    #[test]
    fn c1_controls_del_and_text_hiding_characters_are_escaped() {
        assert_eq!(escaped("\u{9b}2J"), "\\x9b2J");
        assert_eq!(escaped("\u{85}\u{7f}"), "\\x85\\x7f");
        assert_eq!(escaped("evil\u{202e}txt.py"), "evil\\u{202e}txt.py");
        assert_eq!(escaped("a\u{200b}b\u{feff}"), "a\\u{200b}b\\u{feff}");
        assert_eq!(escaped("tab\there\r"), "tab\\there\\r");
        for c in (0..0x20).chain(0x7f..0xa0).filter_map(char::from_u32) {
            assert!(!has_control(&escaped(&c.to_string())), "{c:?}");
        }
    }

    #[test]
    fn a_backslash_is_escaped_so_that_escapes_are_unambiguous() {
        assert_eq!(escaped("\\x1b"), "\\\\x1b");
        assert_ne!(escaped("\\x1b"), escaped("\x1b"));
    }

    #[test]
    fn ordinary_names_are_unchanged() {
        for name in [
            "python3",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "Grüße_überall",
            "数据处理",
            "e\u{301}t\u{e9}",
            "<module>",
            "",
        ] {
            assert_eq!(escaped(name), name);
        }
    }

    #[test]
    fn json_strings_carry_no_terminal_control() {
        let value = serde_json::json!({
            "comm": "\x1b[2J\u{9b}31m\u{7f}\u{202e}",
            "file": "a\n  File \"/etc/shadow\", line 1",
            "name": "数据",
        });
        let json = json_for_terminal(&serde_json::to_string(&value).unwrap());
        assert!(!has_control(&json), "{json}");
        assert!(!json.contains('\u{202e}'), "{json}");
        assert!(
            json.contains(r#""\u001b[2J\u009b31m\u007f\u202e""#),
            "{json}"
        );
        assert!(json.contains("数据"), "{json}");
        let back: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back, value, "the escapes read back as the same strings");
    }
}
