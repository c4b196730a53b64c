//! CPython line tables: instruction offset → source line, for every supported version.
//!
//! Each code object maps its bytecode to source lines with a compact table that alloctrace copies out of the
//! traced process; [`line_at`] decodes it without any help from the interpreter. Lines start at the code's
//! `co_firstlineno` and every format stores deltas from it. Three formats:
//!
//! - [`Format::Lnotab`], 3.8 and 3.9, `co_lnotab` (CPython's `Objects/lnotab_notes.txt`): byte pairs (offset
//!   increment, unsigned; line increment, *signed*, 0x80 being an ordinary -128). The line at an offset is
//!   the start line plus the line increments of every pair reached before the summed offset increments pass
//!   it. Jumps too big for a byte are split over several pairs. Every instruction has a line, and the table
//!   does not say where the bytecode ends: the last line holds for every later offset, as in CPython.
//! - [`Format::Linetable310`], 3.10, `co_linetable` (the 3.10 version of that same file): byte pairs
//!   (length of a range in bytes, unsigned; line delta, signed), each range following the previous from
//!   offset 0. A delta of -128 means the range has no line and leaves the running line as it was, so line
//!   jumps are split into ±127 steps, carried by zero-length ranges. Past the last range there is no line.
//! - [`Format::Locations`], 3.11 and later, `co_linetable` (`Objects/locations.md`): entries whose first byte
//!   has bit 7 set, bits 3–6 a kind and bits 0–2 the number of 2-byte code units covered, minus one; the bytes
//!   after it have bit 7 clear. Kinds 0–9 (short form: same line, one column byte), 10–12 (one-line form: the
//!   line moves down by kind − 10, two column bytes), 13 (no columns: line delta as svarint), 14 (long form:
//!   line delta as svarint, then end-line delta, column + 1 and end column + 1 as varints), 15 (no location:
//!   no line, the running line unchanged). A varint is 6-bit chunks, least significant first, bit 6 set on all
//!   but the last; an svarint is a varint holding `magnitude << 1 | sign`. The running line can go below the
//!   first line: a module's first instruction is on line 0.
//!
//! Tables come from another process's memory and may be torn or stale, so decoding is total: a table that is
//! not one CPython would write yields `None` instead of a panic, and every loop advances through the table.
//! The tests check every instruction of tables written by each real interpreter
//! (`tracer/test_data/python/lines_fixtures.py`).

/// The layout of a code object's line table, which depends only on the interpreter's version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// 3.8 and 3.9: `co_lnotab`.
    Lnotab,
    /// 3.10: `co_linetable`, with signed line deltas and "no line" ranges.
    Linetable310,
    /// 3.11 and later: `co_linetable` as the location table of `Objects/locations.md`.
    Locations,
}

impl Format {
    /// The format used by CPython `major.minor`, for the versions alloctrace supports.
    pub fn for_version(major: u8, minor: u8) -> Option<Self> {
        match (major, minor) {
            (3, 8 | 9) => Some(Self::Lnotab),
            (3, 10) => Some(Self::Linetable310),
            // The format survives beyond 3.13, but nothing else about those interpreters has been checked.
            (3, 11..=13) => Some(Self::Locations),
            _ => None,
        }
    }
}

/// The source line of the instruction at `offset`, a byte offset into the code's bytecode (`co_code`), in a
/// code object whose `co_firstlineno` is `first_line` and whose line table is `table`: `co_lnotab` for 3.8
/// and 3.9, `co_linetable` from 3.10 on.
///
/// The offset is in bytes for every version: 3.8 and 3.9's `f_lasti` as it is, 3.10's `f_lasti` (an
/// instruction index) doubled, and from 3.11 the instruction pointer minus the address of the first code unit.
/// From 3.11 tables cover whole 2-byte code units, and an odd offset is read as the code unit it falls in;
/// cache entries belong to the entry of the instruction they follow, so an offset inside them answers too.
/// (3.11 and 3.12 point `prev_instr` one code unit before the code in a frame that has not started yet:
/// callers must not turn that into an offset.)
///
/// `None` when the instruction has no line (3.10+: instructions the compiler made up), when the offset lies
/// past the table's end (3.10+), or when the table is malformed. Line 0 is a real answer from 3.11: the
/// `RESUME` opening a module.
pub fn line_at(format: Format, first_line: u32, table: &[u8], offset: u32) -> Option<u32> {
    let first_line = i64::from(first_line);
    let offset = u64::from(offset);
    let line = match format {
        Format::Lnotab => lnotab_line(first_line, table, offset),
        Format::Linetable310 => linetable310_line(first_line, table, offset),
        Format::Locations => locations_line(first_line, table, offset),
    }?;
    // Negative or huge lines come only from tables CPython did not write.
    u32::try_from(line).ok()
}

fn lnotab_line(first_line: i64, table: &[u8], offset: u64) -> Option<i64> {
    let (pairs, torn) = table.as_chunks::<2>();
    if !torn.is_empty() {
        return None;
    }
    let mut line = first_line;
    let mut start = 0u64;
    for &[offset_increment, line_increment] in pairs {
        start += u64::from(offset_increment);
        if start > offset {
            break;
        }
        line = line.checked_add(i64::from(i8::from_ne_bytes([line_increment])))?;
    }
    Some(line)
}

fn linetable310_line(first_line: i64, table: &[u8], offset: u64) -> Option<i64> {
    let (pairs, torn) = table.as_chunks::<2>();
    if !torn.is_empty() {
        return None;
    }
    let mut running = first_line;
    let mut end = 0u64;
    for &[length, delta] in pairs {
        let start = end;
        end += u64::from(length);
        let delta = i8::from_ne_bytes([delta]);
        let line = if delta == i8::MIN {
            None
        } else {
            running = running.checked_add(i64::from(delta))?;
            Some(running)
        };
        // Zero-length ranges contain no offset: they only carry line jumps beyond ±127.
        if (start..end).contains(&offset) {
            return line;
        }
    }
    None
}

fn locations_line(first_line: i64, table: &[u8], offset: u64) -> Option<i64> {
    let mut entries = Entries { table, next: 0 };
    let mut running = first_line;
    let mut end = 0u64;
    while let Some(&first) = table.get(entries.next) {
        entries.next += 1;
        // Reading every entry's bytes exactly, rather than skipping to the next byte with bit 7 set as
        // CPython does, lets a table read at the wrong address fail here instead of naming a wrong line.
        if first & 0x80 == 0 {
            return None;
        }
        let kind = (first >> 3) & 0x0f;
        let start = end;
        end += 2 * (u64::from(first & 0x07) + 1);
        let line = match kind {
            0..=9 => {
                entries.inner()?;
                Some(running)
            }
            10..=12 => {
                entries.inner()?;
                entries.inner()?;
                running = running.checked_add(i64::from(kind - 10))?;
                Some(running)
            }
            13 => {
                running = running.checked_add(entries.svarint()?)?;
                Some(running)
            }
            14 => {
                running = running.checked_add(entries.svarint()?)?;
                for _end_line_and_columns in 0..3 {
                    entries.varint()?;
                }
                Some(running)
            }
            _ => None,
        };
        if (start..end).contains(&offset) {
            return line;
        }
    }
    None
}

/// The bytes of a location table after an entry's first byte.
struct Entries<'a> {
    table: &'a [u8],
    next: usize,
}

impl Entries<'_> {
    /// The entry's next byte; `None` if the table ends or the next entry begins first.
    fn inner(&mut self) -> Option<u8> {
        let byte = *self
            .table
            .get(self.next)
            .filter(|byte| **byte & 0x80 == 0)?;
        self.next += 1;
        Some(byte)
    }

    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        // CPython's values fit 32 bits, six chunks; a longer run is garbage and would overflow.
        for shift in (0..36).step_by(6) {
            let byte = self.inner()?;
            value |= u64::from(byte & 0x3f) << shift;
            if byte & 0x40 == 0 {
                return Some(value);
            }
        }
        None
    }

    fn svarint(&mut self) -> Option<i64> {
        let value = self.varint()?;
        let magnitude = i64::try_from(value >> 1).ok()?;
        Some(if value & 1 == 1 {
            -magnitude
        } else {
            magnitude
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    /// A fixture written by `tracer/test_data/python/lines_fixtures.py` under one interpreter.
    #[derive(Deserialize)]
    struct Fixture {
        python: String,
        codes: Vec<Code>,
    }

    #[derive(Deserialize)]
    struct Code {
        name: String,
        first_line: u32,
        code_len: u32,
        table: String,
        /// `co_lines()` as (start, end, line) byte ranges; 3.10 and later only.
        #[serde(default)]
        ranges: Vec<(u32, u32, Option<u32>)>,
        /// (byte offset, line) of each instruction `dis` lists.
        instructions: Vec<(u32, Option<u32>)>,
    }

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Checks the decoder against CPython on every instruction of the fixture, and from 3.10 on every byte
    /// offset of the bytecode and the first offset past it. Returns the number of instructions checked.
    fn check_fixture(json: &str, version: &str, format: Format) -> usize {
        let fixture: Fixture = serde_json::from_str(json).unwrap();
        assert!(
            fixture.python.starts_with(&format!("{version}.")),
            "{} is not {version}",
            fixture.python
        );
        let mut instructions = 0;
        for code in &fixture.codes {
            let table = hex(&code.table);
            let line = |offset| line_at(format, code.first_line, &table, offset);
            for &(offset, expected) in &code.instructions {
                assert_eq!(
                    line(offset),
                    expected,
                    "{version} {} at byte {offset}",
                    code.name
                );
            }
            instructions += code.instructions.len();
            if format == Format::Lnotab {
                continue;
            }
            let mut covered = 0;
            for &(start, end, expected) in &code.ranges {
                assert_eq!(
                    start, covered,
                    "{version} {}: co_lines() has a gap",
                    code.name
                );
                for offset in start..end {
                    assert_eq!(
                        line(offset),
                        expected,
                        "{version} {} at byte {offset}",
                        code.name
                    );
                }
                covered = end;
            }
            assert_eq!(covered, code.code_len, "{version} {}", code.name);
            assert_eq!(
                line(code.code_len),
                None,
                "{version} {} past the end",
                code.name
            );
        }
        instructions
    }

    #[test]
    fn cpython_3_8() {
        let json = include_str!("../../test_data/python/lines-3.8.json");
        assert!(check_fixture(json, "3.8", Format::Lnotab) > 1000);
    }

    #[test]
    fn cpython_3_9() {
        let json = include_str!("../../test_data/python/lines-3.9.json");
        assert!(check_fixture(json, "3.9", Format::Lnotab) > 1000);
    }

    #[test]
    fn cpython_3_10() {
        let json = include_str!("../../test_data/python/lines-3.10.json");
        assert!(check_fixture(json, "3.10", Format::Linetable310) > 1000);
    }

    #[test]
    fn cpython_3_11() {
        let json = include_str!("../../test_data/python/lines-3.11.json");
        assert!(check_fixture(json, "3.11", Format::Locations) > 1000);
    }

    #[test]
    fn cpython_3_12() {
        let json = include_str!("../../test_data/python/lines-3.12.json");
        assert!(check_fixture(json, "3.12", Format::Locations) > 1000);
    }

    #[test]
    fn cpython_3_13() {
        let json = include_str!("../../test_data/python/lines-3.13.json");
        assert!(check_fixture(json, "3.13", Format::Locations) > 1000);
    }

    /// The fixtures prove the location decoder only as far as they hold every kind of entry.
    #[test]
    fn location_fixtures_hold_every_entry_kind() {
        for json in [
            include_str!("../../test_data/python/lines-3.11.json"),
            include_str!("../../test_data/python/lines-3.12.json"),
            include_str!("../../test_data/python/lines-3.13.json"),
        ] {
            let fixture: Fixture = serde_json::from_str(json).unwrap();
            let mut kinds = [false; 16];
            for code in &fixture.codes {
                for byte in hex(&code.table).into_iter().filter(|byte| byte & 0x80 != 0) {
                    kinds[usize::from((byte >> 3) & 0x0f)] = true;
                }
            }
            assert_eq!(kinds, [true; 16], "{}", fixture.python);
        }
    }

    #[test]
    fn formats_by_version() {
        assert_eq!(Format::for_version(3, 7), None);
        assert_eq!(Format::for_version(3, 8), Some(Format::Lnotab));
        assert_eq!(Format::for_version(3, 9), Some(Format::Lnotab));
        assert_eq!(Format::for_version(3, 10), Some(Format::Linetable310));
        assert_eq!(Format::for_version(3, 11), Some(Format::Locations));
        assert_eq!(Format::for_version(3, 13), Some(Format::Locations));
        assert_eq!(Format::for_version(3, 14), None);
        assert_eq!(Format::for_version(2, 8), None);
    }

    #[test]
    fn lnotab() {
        let line = |table: &[u8], offset| line_at(Format::Lnotab, 1, table, offset);
        // lnotab_notes.txt's example: lines 1, 2, 7, 207, 208 from bytes 0, 6, 50, 350, 361, the jump of 300
        // bytes and 200 lines split into (255, 0), (45, 127), (0, 73).
        let table = [6, 1, 44, 5, 255, 0, 45, 127, 0, 73, 11, 1];
        for (offset, expected) in [
            (0, 1),
            (5, 1),
            (6, 2),
            (49, 2),
            (50, 7),
            (349, 7),
            (350, 207),
            (360, 207),
        ] {
            assert_eq!(line(&table, offset), Some(expected), "byte {offset}");
        }
        // The table does not know where the code ends: its last line holds past it, as CPython has it.
        assert_eq!(line(&table, 361), Some(208));
        assert_eq!(line(&table, u32::MAX), Some(208));
        // A code object on a single line has an empty table.
        assert_eq!(line(&[], 0), Some(1));
        assert_eq!(line(&[], 40), Some(1));
        // Line increments are signed, and 0x80 is -128, not a marker.
        assert_eq!(
            line_at(Format::Lnotab, 200, &[2, 0x80, 2, 0xff], 2),
            Some(72)
        );
        assert_eq!(
            line_at(Format::Lnotab, 200, &[2, 0x80, 2, 0xff], 4),
            Some(71)
        );
        assert_eq!(line(&[2, 0x80], 2), None, "below line 0");
        assert_eq!(line(&[6, 1, 44], 0), None, "torn pair");
    }

    #[test]
    fn linetable_310() {
        let line = |table: &[u8], offset| line_at(Format::Linetable310, 10, table, offset);
        // A first range with no line (3.10's GEN_START), then +1, a no-line range that leaves the running
        // line alone, -3, a jump of +300 through zero-length ranges, and a 600-byte range split at 254.
        let table = [
            2, 0x80, 4, 1, 2, 0x80, 2, 0xfd, 0, 127, 0, 127, 2, 46, 254, 0, 254, 0, 92, 0,
        ];
        for (offset, expected) in [
            (0, None),
            (1, None),
            (2, Some(11)),
            (5, Some(11)),
            (6, None),
            (8, Some(8)),
            (10, Some(308)),
            (12, Some(308)),
            (611, Some(308)),
            (612, None),
        ] {
            assert_eq!(line(&table, offset), expected, "byte {offset}");
        }
        assert_eq!(line(&[], 0), None);
        assert_eq!(line(&[2, 0], 2), None, "past the end");
        assert_eq!(line(&[2, 0, 2], 0), None, "torn pair");
        assert_eq!(line(&[2, 0xf0], 0), None, "below line 0");
    }

    #[test]
    fn locations() {
        let line = |table: &[u8], offset| line_at(Format::Locations, 10, table, offset);
        let table = [
            0xf8, // no location, 1 unit
            0x81, 0x00, // short form, 2 units, same line
            0xd8, 0x05, 0x07, // one-line form (kind 11), 1 unit: line + 1
            0xe8, 0x07, // no columns, 1 unit: svarint 7 = -3
            0xf1, 0x50, 0x06, 0x00, 0x01,
            0x02, // long form, 2 units: svarint 400 = +200, then 0, 1, 2
            0xf8, // no location, 1 unit: running line unchanged
            0x80, 0x00, // short form, 1 unit
            0xd0, 0x00, 0x10, // one-line form (kind 10): line + 0
            0xe8, 0x01, // no columns: svarint 1 = -0
        ];
        for (offset, expected) in [
            (0, None),
            (1, None),
            (2, Some(10)),
            (3, Some(10)),
            (5, Some(10)),
            (6, Some(11)),
            (8, Some(8)),
            (10, Some(208)),
            (13, Some(208)),
            (14, None),
            (16, Some(208)),
            (18, Some(208)),
            (20, Some(208)),
            (22, None),
        ] {
            assert_eq!(line(&table, offset), expected, "byte {offset}");
        }
        // A module starts on line 1 with its RESUME on line 0.
        assert_eq!(
            line_at(Format::Locations, 1, &[0xf0, 0x03, 0x01, 0x01, 0x01], 0),
            Some(0)
        );
        assert_eq!(line(&[], 0), None);
        assert_eq!(line(&[0x80, 0x00], 2), None, "past the end");
    }

    #[test]
    fn locations_malformed() {
        let line = |table: &[u8], offset| line_at(Format::Locations, 10, table, offset);
        assert_eq!(
            line(&[0xe8, 0x47], 0),
            None,
            "varint cut by the table's end"
        );
        assert_eq!(
            line(&[0xe8, 0x47, 0x80, 0x00], 0),
            None,
            "varint cut by the next entry"
        );
        assert_eq!(
            line(&[0xf0, 0x02, 0x00, 0x01], 0),
            None,
            "long form missing its end column"
        );
        assert_eq!(line(&[0x80], 0), None, "short form missing its column byte");
        assert_eq!(
            line(&[0xd8, 0x05], 0),
            None,
            "one-line form missing a column byte"
        );
        assert_eq!(
            line(&[0x80, 0x00, 0x00, 0x80, 0x00], 2),
            None,
            "a stray byte between entries"
        );
        assert_eq!(
            line(&[0x00, 0x80, 0x00], 0),
            None,
            "not starting at an entry"
        );
        assert_eq!(
            line(&[0xe8, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x3f], 0),
            None,
            "endless varint"
        );
        assert_eq!(line(&[0xe8, 0x17], 0), None, "below line 0");
    }

    /// Garbage of every shape, as a torn read would give: each call must return, whatever it returns.
    #[test]
    fn garbage_never_panics() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let table: Vec<u8> = (0..next() % 64).map(|_| next() as u8).collect();
            let offset = (next() % 600) as u32;
            let first_line = next() as u32;
            for format in [Format::Lnotab, Format::Linetable310, Format::Locations] {
                line_at(format, first_line, &table, offset);
                line_at(format, first_line, &table, u32::MAX);
            }
        }
    }
}
