//! The registry's cache of ELF objects, one entry per file (device + inode), and the objects that could not be
//! read. Each object is bounded on its own (see [`super::module`]), but a target can map as many distinct files
//! as it likes: the cache as a whole is bounded too, in entries and in bytes of symbol data, and evicts the
//! object used longest ago, counting what it evicts. An evicted object is read again when a frame needs it.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use super::{maps::FileId, module::Module};

/// The most objects (and failures) kept: a host's processes map a few hundred distinct libraries.
pub const MAX_CACHED_MODULES: usize = 4096;

/// The most bytes of symbol tables kept: libpython takes about 3 MiB, libLLVM about 15 MiB; one object may
/// take up to about 60 MiB ([`super::module::MAX_SYMBOLS`], [`super::module::MAX_SYMBOL_NAME_BYTES`]).
pub const MAX_CACHED_MODULE_BYTES: usize = 96 << 20;

/// What a failure (an object that could not be read) is charged.
const FAILURE_BYTES: usize = 64;

struct Entry {
    /// `None`: the object could not be read through `failed_through`, and is not tried again that way for
    /// every frame.
    module: Option<Arc<Module>>,
    /// The path a failed read went through. A file of a process in another mount namespace is opened through
    /// `/proc/PID/map_files/START-END`, and the loader splits the first mapping of a library into segments
    /// moments after making it: a name read from an earlier `maps` is gone by then. Such a failure must not
    /// stand for the file, so another path (a later mapping's) is tried once again.
    failed_through: Option<PathBuf>,
    /// When it was last used, in look-ups: the smallest is evicted first.
    last_used: u64,
}

impl Entry {
    fn bytes(&self) -> usize {
        self.module
            .as_ref()
            .map_or(FAILURE_BYTES, |m| m.heap_bytes())
    }
}

pub struct ModuleCache {
    entries: HashMap<FileId, Entry>,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
    uses: u64,
    evicted: u64,
}

impl Default for ModuleCache {
    fn default() -> Self {
        Self::with_bounds(MAX_CACHED_MODULES, MAX_CACHED_MODULE_BYTES)
    }
}

impl ModuleCache {
    pub fn with_bounds(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            entries: HashMap::new(),
            bytes: 0,
            max_entries: max_entries.max(1),
            max_bytes,
            uses: 0,
            evicted: 0,
        }
    }

    /// The object of `file`, loaded by `load` through `through` when it is not cached. A failure is cached as
    /// well, for that path: through another one it is tried again.
    pub fn get_or_load(
        &mut self,
        file: FileId,
        through: &Path,
        load: impl FnOnce() -> Option<Arc<Module>>,
    ) -> Option<Arc<Module>> {
        self.uses += 1;
        if let Some(entry) = self.entries.get_mut(&file) {
            entry.last_used = self.uses;
            if entry.module.is_some() || entry.failed_through.as_deref() == Some(through) {
                return entry.module.clone();
            }
            if let Some(failed) = self.entries.remove(&file) {
                self.bytes -= failed.bytes();
            }
        }
        let module = load();
        let failed_through = module.is_none().then(|| through.to_path_buf());
        self.insert(file, module.clone(), failed_through);
        module
    }

    /// Caches an object loaded before any process mapped it; one already cached stays.
    pub fn insert_loaded(&mut self, file: FileId, module: Arc<Module>) {
        self.uses += 1;
        if !self.entries.contains_key(&file) {
            self.insert(file, Some(module), None);
        }
    }

    fn insert(
        &mut self,
        file: FileId,
        module: Option<Arc<Module>>,
        failed_through: Option<PathBuf>,
    ) {
        let entry = Entry {
            module,
            failed_through,
            last_used: self.uses,
        };
        self.bytes += entry.bytes();
        self.entries.insert(file, entry);
        // The newest entry always stays: each object is bounded on its own, below the cache's bound.
        while self.entries.len() > 1
            && (self.entries.len() > self.max_entries || self.bytes > self.max_bytes)
        {
            let oldest = self
                .entries
                .iter()
                .filter(|(id, _)| **id != file)
                .min_by_key(|(_, entry)| entry.last_used)
                .map(|(&id, _)| id);
            let Some(oldest) = oldest else { break };
            if let Some(entry) = self.entries.remove(&oldest) {
                self.bytes -= entry.bytes();
                self.evicted += 1;
            }
        }
    }

    /// Objects (and failures) evicted to stay within the bounds.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Bytes the cached objects take, by [`Module::heap_bytes`].
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.bytes
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(inode: u64) -> FileId {
        FileId {
            dev_major: 8,
            dev_minor: 1,
            inode,
        }
    }

    /// The test binary: a real ELF object with a symbol table, of some megabytes of symbols.
    fn module() -> Arc<Module> {
        let exe = std::env::current_exe().unwrap();
        Arc::new(Module::load(&exe, "test", Path::new("/")).unwrap())
    }

    #[test]
    fn evicts_the_object_used_longest_ago_past_its_entries() {
        let mut cache = ModuleCache::with_bounds(3, usize::MAX);
        let loaded = module();
        for inode in 1..=3 {
            cache.get_or_load(file(inode), Path::new("/a"), || Some(Arc::clone(&loaded)));
        }
        // 1 is used again: 2 is now the one used longest ago.
        assert!(
            cache
                .get_or_load(file(1), Path::new("/a"), || panic!("cached"))
                .is_some()
        );
        cache.get_or_load(file(4), Path::new("/a"), || None);
        assert_eq!((cache.len(), cache.evicted()), (3, 1));
        let mut reloaded = false;
        cache.get_or_load(file(2), Path::new("/a"), || {
            reloaded = true;
            Some(Arc::clone(&loaded))
        });
        assert!(reloaded, "an evicted object is read again");
        // Reading 2 again evicted 3, the one used longest ago then.
        assert_eq!(cache.evicted(), 2);
        assert!(
            cache
                .get_or_load(file(1), Path::new("/a"), || panic!("kept"))
                .is_some()
        );
        assert!(
            cache
                .get_or_load(file(4), Path::new("/a"), || panic!("kept"))
                .is_none()
        );
    }

    #[test]
    fn stays_within_its_bytes_and_counts_what_it_evicts() {
        let loaded = module();
        let one = loaded.heap_bytes();
        assert!(one > 100_000, "the test binary has symbols: {one} bytes");
        let mut cache = ModuleCache::with_bounds(MAX_CACHED_MODULES, 2 * one + FAILURE_BYTES);
        for inode in 0..10 {
            cache.get_or_load(file(inode), Path::new("/a"), || Some(Arc::clone(&loaded)));
            assert!(cache.bytes() <= 2 * one + FAILURE_BYTES);
        }
        assert_eq!((cache.len(), cache.evicted()), (2, 8));
        // A failure is charged little: one fits in what is left; a second does not, and the object used
        // longest ago goes.
        cache.get_or_load(file(100), Path::new("/a"), || None);
        assert_eq!((cache.len(), cache.evicted()), (3, 8));
        cache.get_or_load(file(101), Path::new("/a"), || None);
        assert_eq!((cache.len(), cache.evicted()), (3, 9));
        assert!(
            cache
                .get_or_load(file(9), Path::new("/a"), || panic!("kept"))
                .is_some()
        );
        // An object larger than the whole bound is still kept, alone, as the newest.
        let mut tiny = ModuleCache::with_bounds(MAX_CACHED_MODULES, 1);
        tiny.get_or_load(file(1), Path::new("/a"), || Some(Arc::clone(&loaded)));
        tiny.get_or_load(file(2), Path::new("/a"), || Some(Arc::clone(&loaded)));
        assert_eq!((tiny.len(), tiny.evicted()), (1, 1));
        assert!(
            tiny.get_or_load(file(2), Path::new("/a"), || panic!("kept"))
                .is_some()
        );
    }

    #[test]
    fn a_failure_is_retried_through_another_path_only() {
        let mut cache = ModuleCache::default();
        let gone = Path::new("/proc/7/map_files/1000-9000");
        assert!(cache.get_or_load(file(1), gone, || None).is_none());
        assert!(
            cache
                .get_or_load(file(1), gone, || panic!("cached"))
                .is_none()
        );
        let loaded = module();
        let split = Path::new("/proc/7/map_files/1000-2000");
        assert!(
            cache
                .get_or_load(file(1), split, || Some(Arc::clone(&loaded)))
                .is_some()
        );
        assert!(
            cache
                .get_or_load(file(1), gone, || panic!("cached"))
                .is_some()
        );
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.bytes(), loaded.heap_bytes());
    }

    #[test]
    fn an_object_loaded_before_it_is_mapped_is_cached_once() {
        let mut cache = ModuleCache::with_bounds(2, usize::MAX);
        let loaded = module();
        cache.insert_loaded(file(1), Arc::clone(&loaded));
        cache.insert_loaded(file(1), Arc::clone(&loaded));
        assert_eq!((cache.len(), cache.bytes()), (1, loaded.heap_bytes()));
        assert!(
            cache
                .get_or_load(file(1), Path::new("/a"), || panic!("cached"))
                .is_some()
        );
    }
}
