//! pprof: a gzipped `perftools.profiles.Profile`, as `go tool pprof`, Pyroscope, Parca and speedscope read
//! it. In-use and allocated space and objects by stack; Python frames as Functions with their file and Lines
//! with their line numbers; native frames with the Mapping of their module (path, build id) and their address
//! in it; labels for the process, container and Airflow task.

use std::{
    collections::HashMap,
    io::{self, Write},
    time::{SystemTime, UNIX_EPOCH},
};

use flate2::{Compression, write::GzEncoder};
use prost::Message as _;

use super::profile::{Profile, frame_name};
use crate::procs::Frame;

/// The messages of pprof's `profile.proto` (github.com/google/pprof, proto/profile.proto), written out with
/// prost's derive rather than generated at build time: generating needs `protoc` (not installed here) or
/// `protox` and `prost-build` (some forty more crates to build), for nine messages whose field numbers have
/// not changed since the format was published. The field numbers below are the proto's; `go tool pprof`
/// reading what this module writes is the test that they are right.
mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "3")]
        pub mapping: Vec<Mapping>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(message, optional, tag = "11")]
        pub period_type: Option<ValueType>,
        #[prost(int64, tag = "12")]
        pub period: i64,
        #[prost(int64, repeated, tag = "13")]
        pub comment: Vec<i64>,
        #[prost(int64, tag = "14")]
        pub default_sample_type: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        #[prost(int64, tag = "1")]
        pub key: i64,
        #[prost(int64, tag = "2")]
        pub str: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mapping {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub memory_start: u64,
        #[prost(uint64, tag = "3")]
        pub memory_limit: u64,
        #[prost(uint64, tag = "4")]
        pub file_offset: u64,
        #[prost(int64, tag = "5")]
        pub filename: i64,
        #[prost(int64, tag = "6")]
        pub build_id: i64,
        #[prost(bool, tag = "7")]
        pub has_functions: bool,
        #[prost(bool, tag = "8")]
        pub has_filenames: bool,
        #[prost(bool, tag = "9")]
        pub has_line_numbers: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        #[prost(uint64, tag = "3")]
        pub address: u64,
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        #[prost(int64, tag = "4")]
        pub filename: i64,
        #[prost(int64, tag = "5")]
        pub start_line: i64,
    }
}

/// Builds the tables of a pprof profile, each entry once: strings, functions, mappings, locations.
#[derive(Default)]
struct Builder {
    profile: proto::Profile,
    strings: HashMap<String, i64>,
    functions: HashMap<(String, Option<String>), u64>,
    mappings: HashMap<String, u64>,
    locations: HashMap<Vec<Frame>, u64>,
}

impl Builder {
    fn string(&mut self, text: &str) -> i64 {
        if let Some(&index) = self.strings.get(text) {
            return index;
        }
        let index = self.profile.string_table.len() as i64;
        self.profile.string_table.push(text.to_owned());
        self.strings.insert(text.to_owned(), index);
        index
    }

    fn value_type(&mut self, kind: &str, unit: &str) -> proto::ValueType {
        proto::ValueType {
            r#type: self.string(kind),
            unit: self.string(unit),
        }
    }

    /// A function by name and file. Its start line is 0, which pprof reads as unknown: a frame records the
    /// line being run, not where its function begins.
    fn function(&mut self, name: &str, file: Option<&str>) -> u64 {
        let key = (name.to_owned(), file.map(str::to_owned));
        if let Some(&id) = self.functions.get(&key) {
            return id;
        }
        let id = self.profile.function.len() as u64 + 1;
        let name = self.string(name);
        let filename = self.string(file.unwrap_or(""));
        self.profile.function.push(proto::Function {
            id,
            name,
            // Left empty: pprof "demangles" a function whose system name is its name, and its simple demangling
            // strips what is between `<` and `>`, so Python's `<module>` would read `<unknown>`. The names here
            // are already as reports show them.
            system_name: 0,
            filename,
            start_line: 0,
        });
        self.functions.insert(key, id);
        id
    }

    /// A module's mapping. Its address range is not known here (frames hold addresses inside the module's
    /// ELF file, not in the process), so it is left empty: every frame is already named, which
    /// `has_functions` tells pprof, so it never looks addresses up in the range.
    fn mapping(&mut self, module: &str, build_id: Option<&str>) -> u64 {
        if let Some(&id) = self.mappings.get(module) {
            return id;
        }
        let id = self.profile.mapping.len() as u64 + 1;
        let filename = self.string(module);
        let build_id = self.string(build_id.unwrap_or(""));
        self.profile.mapping.push(proto::Mapping {
            id,
            filename,
            build_id,
            has_functions: true,
            ..Default::default()
        });
        self.mappings.insert(module.to_owned(), id);
        id
    }

    /// The location of `frames`: one frame, or a native frame preceded by the calls inlined into it
    /// (innermost first), which pprof keeps as one location with a line each, the caller last.
    fn location(&mut self, frames: &[Frame], build_ids: &HashMap<&str, &str>) -> u64 {
        if let Some(&id) = self.locations.get(frames) {
            return id;
        }
        let id = self.profile.location.len() as u64 + 1;
        let Some(frame) = frames.last() else {
            return 0;
        };
        let mapping_id = match (&frame.module, frame.is_python()) {
            (Some(module), false) => self.mapping(module, build_ids.get(module.as_str()).copied()),
            _ => 0,
        };
        let line = frames
            .iter()
            .map(|frame| {
                // Unnamed native frames are named `module+0xoffset`, as in flame graphs.
                let name = if frame.is_python() {
                    frame.function.clone().unwrap_or_else(|| "?".to_owned())
                } else {
                    frame_name(frame)
                };
                proto::Line {
                    function_id: self.function(&name, frame.file.as_deref()),
                    line: frame.line.map_or(0, i64::from),
                }
            })
            .collect();
        self.profile.location.push(proto::Location {
            id,
            mapping_id,
            address: if frame.is_python() {
                0
            } else {
                frame.offset.unwrap_or(0)
            },
            line,
        });
        self.locations.insert(frames.to_vec(), id);
        id
    }

    fn label(&mut self, key: &str, value: &str) -> proto::Label {
        proto::Label {
            key: self.string(key),
            str: self.string(value),
        }
    }
}

/// The profile, encoded (not yet compressed).
fn encode(profile: &Profile) -> Vec<u8> {
    let mut b = Builder::default();
    // Index 0 of the string table is the empty string.
    b.string("");
    let mut types = vec![
        b.value_type("inuse_space", "bytes"),
        b.value_type("inuse_objects", "count"),
    ];
    if profile.alloc_known {
        types.push(b.value_type("alloc_space", "bytes"));
        types.push(b.value_type("alloc_objects", "count"));
    }
    b.profile.sample_type = types;
    b.profile.default_sample_type = b.string("inuse_space");
    if let Some(every) = profile.sampled_every_bytes {
        b.profile.period_type = Some(b.value_type("space", "bytes"));
        b.profile.period = every as i64;
    }
    let comment = b.string(&profile.title);
    b.profile.comment = vec![comment];
    b.profile.time_nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    b.profile.duration_nanos = profile.duration_ns as i64;
    let build_ids: HashMap<&str, &str> = profile
        .build_ids
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    for sample in &profile.samples {
        // Each run of inlined frames goes with the frame they were inlined into, after them.
        let location_id = sample
            .frames
            .split_inclusive(|f| !f.inlined)
            .map(|frames| b.location(frames, &build_ids))
            .collect();
        let v = sample.values;
        let mut value = vec![v.inuse_bytes as i64, v.inuse_objects as i64];
        if profile.alloc_known {
            value.extend([v.alloc_bytes as i64, v.alloc_objects as i64]);
        }
        let l = &sample.labels;
        let mut label = vec![b.label("pid", &l.pid.to_string()), b.label("comm", &l.comm)];
        for (key, text) in [
            ("kind", (!l.kind.is_empty()).then_some(l.kind)),
            ("container", l.container.as_deref()),
            ("container_id", l.container_id.as_deref()),
            ("dag_id", l.dag_id.as_deref()),
            ("task_id", l.task_id.as_deref()),
        ] {
            if let Some(text) = text {
                label.push(b.label(key, text));
            }
        }
        b.profile.sample.push(proto::Sample {
            location_id,
            value,
            label,
        });
    }
    b.profile.encode_to_vec()
}

/// `--format pprof`: the profile, gzipped, as pprof files are.
pub fn write(profile: &Profile, out: &mut dyn Write) -> io::Result<()> {
    let mut gz = GzEncoder::new(out, Compression::default());
    gz.write_all(&encode(profile))?;
    gz.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;
    use crate::output::profile::tests::sample_profile;

    fn decoded(profile: &Profile) -> proto::Profile {
        let mut gz = Vec::new();
        write(profile, &mut gz).unwrap();
        let mut raw = Vec::new();
        io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut raw).unwrap();
        proto::Profile::decode(&raw[..]).unwrap()
    }

    #[test]
    fn samples_carry_four_values_locations_and_labels() {
        let mut profile = sample_profile();
        profile
            .build_ids
            .insert("/work/sites".to_owned(), "abcd".to_owned());
        let p = decoded(&profile);
        let s = |i: i64| p.string_table[i as usize].as_str();
        assert_eq!(s(0), "");
        let types: Vec<(&str, &str)> = p
            .sample_type
            .iter()
            .map(|t| (s(t.r#type), s(t.unit)))
            .collect();
        assert_eq!(
            types,
            [
                ("inuse_space", "bytes"),
                ("inuse_objects", "count"),
                ("alloc_space", "bytes"),
                ("alloc_objects", "count")
            ]
        );
        assert_eq!(s(p.default_sample_type), "inuse_space");
        assert_eq!((p.period_type.is_none(), p.period), (true, 0));
        assert_eq!(p.sample[1].value, [100_000, 100, 100_000, 100]);
        // Innermost first: the Python frame `load` is the second location of the first sample.
        let load = &p.location[p.sample[0].location_id[1] as usize - 1];
        assert_eq!((load.mapping_id, load.line[0].line), (0, 12));
        let function = &p.function[load.line[0].function_id as usize - 1];
        assert_eq!(
            (s(function.name), s(function.filename)),
            ("load", "/app/etl.py")
        );
        // Both Python frames share one file but are two functions; `main` is native.
        assert_eq!(p.function.len(), 6);
        let leak = &p.location[p.sample[1].location_id[0] as usize - 1];
        let mapping = &p.mapping[leak.mapping_id as usize - 1];
        assert_eq!(
            (s(mapping.filename), s(mapping.build_id), leak.address),
            ("/work/sites", "abcd", 0x1139)
        );
        let labels: Vec<(&str, &str)> = p.sample[1]
            .label
            .iter()
            .map(|l| (s(l.key), s(l.str)))
            .collect();
        assert_eq!(
            labels,
            [
                ("pid", "20"),
                ("comm", "sites"),
                ("kind", "malloc"),
                ("container", "web"),
                ("dag_id", "etl"),
                ("task_id", "load")
            ]
        );
    }

    #[test]
    fn sampled_profiles_say_their_period_and_live_only_ones_leave_alloc_out() {
        let mut profile = sample_profile();
        profile.sampled_every_bytes = Some(512 << 10);
        profile.alloc_known = false;
        let p = decoded(&profile);
        assert_eq!(p.period, 512 << 10);
        let period = p.period_type.unwrap();
        assert_eq!(
            (
                p.string_table[period.r#type as usize].as_str(),
                p.string_table[period.unit as usize].as_str()
            ),
            ("space", "bytes")
        );
        assert_eq!(p.sample_type.len(), 2);
        assert_eq!(p.sample[0].value, [3000, 3]);
    }
}
