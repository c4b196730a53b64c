//! The seed workload's JSON document: 200,000 records, about 225 MB, generated at bench time from a fixed seed
//! (the same bytes on every machine, and nothing large in the repository), and kept under `target/bench/seed/`
//! between benches.

use std::{
    fs::{self, File},
    io::BufWriter,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

pub const RECORDS: u64 = 200_000;
/// Part of the file's name: a change to what is generated must change it, so that a cached document of the old
/// shape is not reused.
const VERSION: u32 = 2;
const WORDS: [&str; 32] = [
    "alpha", "bravo", "cargo", "delta", "ember", "fjord", "gamma", "harbor", "index", "juniper",
    "kernel", "lumen", "meadow", "nectar", "orbit", "pixel", "quartz", "river", "signal", "timber",
    "umbra", "vector", "willow", "xenon", "yonder", "zephyr", "anchor", "basalt", "cobalt", "dune",
    "ether", "falcon",
];

/// The document's path, generated first if it is not there yet.
pub fn ensure(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("records-{RECORDS}-v{VERSION}.json"));
    if path.exists() {
        return Ok(path);
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    eprintln!("xtask: bench: generating {}", path.display());
    // Written aside and renamed, so that an interrupted bench leaves no partial document to be reused.
    let partial = path.with_extension("json.partial");
    let file =
        File::create(&partial).with_context(|| format!("cannot create {}", partial.display()))?;
    let mut out = BufWriter::new(file);
    write_document(&mut out, RECORDS)
        .with_context(|| format!("cannot write {}", partial.display()))?;
    out.into_inner()
        .map_err(|err| err.into_error())
        .and_then(|file| file.sync_all())
        .with_context(|| format!("cannot write {}", partial.display()))?;
    fs::rename(&partial, &path).with_context(|| format!("cannot rename {}", partial.display()))?;
    Ok(path)
}

/// A JSON array of `records` records, one a line. Each has numbers, strings, a nested object, two lists and a
/// description of 300 to 1,080 characters: most are over 512 bytes as Python strings, and so come from libc's
/// malloc rather than pymalloc, as a service's text fields do.
fn write_document(out: &mut impl std::io::Write, records: u64) -> std::io::Result<()> {
    let mut random = SplitMix64(0x5eed_0000_2026_0008);
    out.write_all(b"[\n")?;
    for id in 0..records {
        let mut word = || WORDS[random.below(WORDS.len() as u64) as usize];
        let (first, last, city, street) = (word(), word(), word(), word());
        let tags: Vec<String> = (0..1 + random.below(6))
            .map(|_| format!("\"{}\"", WORDS[random.below(WORDS.len() as u64) as usize]))
            .collect();
        let history: Vec<String> = (0..5 + random.below(11))
            .map(|_| random.below(100_000).to_string())
            .collect();
        let description_length = 300 + random.below(781) as usize;
        let mut description = String::with_capacity(description_length + 16);
        while description.len() < description_length {
            if !description.is_empty() {
                description.push(' ');
            }
            description.push_str(WORDS[random.below(WORDS.len() as u64) as usize]);
        }
        description.truncate(description_length);
        writeln!(
            out,
            "{{\"id\": {id}, \"uuid\": \"{:016x}{:016x}\", \"name\": \"{first} {last}\", \
             \"email\": \"{first}.{last}{id}@example.com\", \"active\": {}, \"score\": {}.{:03}, \
             \"created\": \"2024-{:02}-{:02}T{:02}:{:02}:{:02}Z\", \"tags\": [{}], \
             \"address\": {{\"street\": \"{} {street} street\", \"city\": \"{city}\", \"zip\": \"{:05}\", \
             \"country\": \"{}\"}}, \"history\": [{}], \"description\": \"{description}\"}}{}",
            random.next(),
            random.next(),
            random.below(2) == 1,
            random.below(1000),
            random.below(1000),
            1 + random.below(12),
            1 + random.below(28),
            random.below(24),
            random.below(60),
            random.below(60),
            tags.join(", "),
            1 + random.below(999),
            random.below(100_000),
            WORDS[random.below(WORDS.len() as u64) as usize],
            history.join(", "),
            if id + 1 < records { "," } else { "" },
        )?;
    }
    out.write_all(b"]\n")
}

/// Steele, Lea and Flood's SplitMix64: a fixed, tiny generator, so that the document is the same bytes on every
/// machine without a dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (the modulo bias is irrelevant here).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_json_and_the_same_every_time() {
        let (mut one, mut two) = (Vec::new(), Vec::new());
        write_document(&mut one, 1000).unwrap();
        write_document(&mut two, 1000).unwrap();
        assert_eq!(one, two);
        let records: serde_json::Value = serde_json::from_slice(&one).unwrap();
        assert_eq!(records.as_array().unwrap().len(), 1000);
    }
}
