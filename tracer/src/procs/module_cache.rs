//! The registry's cache of ELF objects, one entry per file (device + inode + build id, an [`ObjectKey`]), and the
//! objects that could not be read. Each object is bounded on its own (see [`super::module`]), but a target can map
//! as many distinct files as it likes: the cache as a whole is bounded too, in entries and in bytes of symbol data,
//! and evicts the object used longest ago, counting what it evicts. An evicted object is read again when a frame
//! needs it.
//!
//! Every container has its own copy of the same libraries (its own overlay, its own device): the file is read for
//! each, but an object whose content equals one already cached (every symbol, name, segment, and the path it is
//! mapped from) is kept once, shared by the entries of every file it came from, and charged once. The contents are
//! compared, not a build id: a hostile container could give its own file another's build id and different names,
//! and would then name the frames of the other's processes.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use super::{
    maps::FileId,
    module::{BuildId, Module},
};

/// The most objects (and failures) kept: a host's processes map a few hundred distinct libraries.
pub const MAX_CACHED_MODULES: usize = 4096;

/// The most bytes of symbol tables kept: libpython takes about 3 MiB, libLLVM about 15 MiB; one object may
/// take up to about 60 MiB ([`super::module::MAX_SYMBOLS`], [`super::module::MAX_SYMBOL_NAME_BYTES`]).
pub const MAX_CACHED_MODULE_BYTES: usize = 96 << 20;

/// What an entry is charged besides its object (the whole charge of a failure, an object that could not be
/// read).
const ENTRY_BYTES: usize = 64;

/// What a cached object is known by. Device and inode alone can name another file later: a deleted file's
/// inode is reused, and so are the anonymous devices of overlay mounts as containers come and go; the build
/// id tells such a newcomer from the object cached for its predecessor. The cache of unwind sections
/// ([`super::unwind`]) is keyed by the content alone ([`ObjectKey::content`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ObjectKey {
    pub file: FileId,
    pub build_id: Option<BuildId>,
}

impl ObjectKey {
    /// What tells the object's content from another's: its build id where it has one, else its file. Every
    /// container of an image maps the same libc and libpython, each through an overlay mount of its own (another
    /// device): one object by build id, which what depends only on the content (unwind sections) shares.
    pub fn content(&self) -> ContentKey {
        match &self.build_id {
            Some(build_id) => ContentKey::BuildId(build_id.clone()),
            None => ContentKey::File(self.file),
        }
    }
}

/// An object's content, as [`ObjectKey::content`] names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ContentKey {
    BuildId(BuildId),
    File(FileId),
}

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

pub struct ModuleCache {
    entries: HashMap<ObjectKey, Entry>,
    /// How many entries hold each distinct object (by address): an object is charged with its first.
    holders: HashMap<*const Module, usize>,
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
            holders: HashMap::new(),
            bytes: 0,
            max_entries: max_entries.max(1),
            max_bytes,
            uses: 0,
            evicted: 0,
        }
    }

    /// The object of `file`, loaded by `load` through `through` when it is not cached (and then shared with an
    /// equal one cached for another file). A failure is cached as well, for that path: through another one it
    /// is tried again.
    pub fn get_or_load(
        &mut self,
        key: &ObjectKey,
        through: &Path,
        load: impl FnOnce() -> Option<Module>,
    ) -> Option<Arc<Module>> {
        self.uses += 1;
        if let Some(entry) = self.entries.get_mut(key) {
            entry.last_used = self.uses;
            if entry.module.is_some() || entry.failed_through.as_deref() == Some(through) {
                return entry.module.clone();
            }
            self.remove(key);
        }
        let module = load().map(|loaded| self.shared(loaded));
        let failed_through = module.is_none().then(|| through.to_path_buf());
        self.insert(key.clone(), module.clone(), failed_through);
        module
    }

    /// Caches an object loaded from `file` before any process mapped it; one already cached stays.
    pub fn insert_loaded(&mut self, file: FileId, module: Arc<Module>) {
        self.uses += 1;
        let key = ObjectKey {
            file,
            build_id: module.build_id().cloned(),
        };
        if !self.entries.contains_key(&key) {
            self.insert(key, Some(module), None);
        }
    }

    fn insert(
        &mut self,
        key: ObjectKey,
        module: Option<Arc<Module>>,
        failed_through: Option<PathBuf>,
    ) {
        self.bytes += ENTRY_BYTES;
        if let Some(module) = &module {
            let holders = self.holders.entry(Arc::as_ptr(module)).or_default();
            if *holders == 0 {
                self.bytes += module.heap_bytes();
            }
            *holders += 1;
        }
        let entry = Entry {
            module,
            failed_through,
            last_used: self.uses,
        };
        self.entries.insert(key.clone(), entry);
        // The newest entry always stays: each object is bounded on its own, below the cache's bound.
        while self.entries.len() > 1
            && (self.entries.len() > self.max_entries || self.bytes > self.max_bytes)
        {
            let oldest = self
                .entries
                .iter()
                .filter(|(id, _)| **id != key)
                .min_by_key(|(_, entry)| entry.last_used)
                .map(|(id, _)| id.clone());
            let Some(oldest) = oldest else { break };
            self.remove(&oldest);
            self.evicted += 1;
        }
    }

    /// The cached object equal to `loaded`, if there is one, else `loaded`.
    fn shared(&self, loaded: Module) -> Arc<Module> {
        let same = self
            .entries
            .values()
            .filter_map(|entry| entry.module.as_ref())
            .find(|cached| cached.heap_bytes() == loaded.heap_bytes() && ***cached == loaded);
        match same {
            Some(cached) => Arc::clone(cached),
            None => Arc::new(loaded),
        }
    }

    /// Drops the entry of `key`, and the charge of its object with its last holder.
    fn remove(&mut self, key: &ObjectKey) {
        let Some(entry) = self.entries.remove(key) else {
            return;
        };
        self.bytes -= ENTRY_BYTES;
        if let Some(module) = entry.module {
            let key = Arc::as_ptr(&module);
            if let Some(holders) = self.holders.get_mut(&key) {
                *holders -= 1;
                if *holders == 0 {
                    self.holders.remove(&key);
                    self.bytes -= module.heap_bytes();
                }
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

    /// The key of a file whose object has the test binary's build id (as [`module`]'s have).
    fn key(inode: u64) -> ObjectKey {
        ObjectKey {
            file: file(inode),
            build_id: super::super::module::read_build_id(
                &std::env::current_exe().unwrap(),
                "test",
            ),
        }
    }

    /// The test binary, as mapped from `path`: a real ELF object with a symbol table, of some megabytes of
    /// symbols. Objects of two paths differ.
    fn module(path: &str) -> Module {
        let exe = std::env::current_exe().unwrap();
        Module::load(&exe, path).unwrap()
    }

    #[test]
    fn evicts_the_object_used_longest_ago_past_its_entries() {
        let mut cache = ModuleCache::with_bounds(3, usize::MAX);
        for inode in 1..=3 {
            cache.get_or_load(&key(inode), Path::new("/a"), || {
                Some(module(&inode.to_string()))
            });
        }
        // 1 is used again: 2 is now the one used longest ago.
        assert!(
            cache
                .get_or_load(&key(1), Path::new("/a"), || panic!("cached"))
                .is_some()
        );
        cache.get_or_load(&key(4), Path::new("/a"), || None);
        assert_eq!((cache.len(), cache.evicted()), (3, 1));
        let mut reloaded = false;
        cache.get_or_load(&key(2), Path::new("/a"), || {
            reloaded = true;
            Some(module("2"))
        });
        assert!(reloaded, "an evicted object is read again");
        // Reading 2 again evicted 3, the one used longest ago then.
        assert_eq!(cache.evicted(), 2);
        assert!(
            cache
                .get_or_load(&key(1), Path::new("/a"), || panic!("kept"))
                .is_some()
        );
        assert!(
            cache
                .get_or_load(&key(4), Path::new("/a"), || panic!("kept"))
                .is_none()
        );
    }

    #[test]
    fn stays_within_its_bytes_and_counts_what_it_evicts() {
        let one = module("0").heap_bytes();
        assert!(one > 100_000, "the test binary has symbols: {one} bytes");
        // Room for two objects (one-digit paths: the same size) and three entries.
        let bound = 2 * one + 3 * ENTRY_BYTES;
        let mut cache = ModuleCache::with_bounds(MAX_CACHED_MODULES, bound);
        for inode in 0..10 {
            cache.get_or_load(&key(inode), Path::new("/a"), || {
                Some(module(&inode.to_string()))
            });
            assert!(cache.bytes() <= bound);
        }
        assert_eq!((cache.len(), cache.evicted()), (2, 8));
        // A failure is charged little: one fits in what is left; a second does not, and the object used
        // longest ago goes.
        cache.get_or_load(&key(100), Path::new("/a"), || None);
        assert_eq!((cache.len(), cache.evicted()), (3, 8));
        cache.get_or_load(&key(101), Path::new("/a"), || None);
        assert_eq!((cache.len(), cache.evicted()), (3, 9));
        assert!(
            cache
                .get_or_load(&key(9), Path::new("/a"), || panic!("kept"))
                .is_some()
        );
        // An object larger than the whole bound is still kept, alone, as the newest.
        let mut tiny = ModuleCache::with_bounds(MAX_CACHED_MODULES, 1);
        tiny.get_or_load(&key(1), Path::new("/a"), || Some(module("1")));
        tiny.get_or_load(&key(2), Path::new("/a"), || Some(module("2")));
        assert_eq!((tiny.len(), tiny.evicted()), (1, 1));
        assert!(
            tiny.get_or_load(&key(2), Path::new("/a"), || panic!("kept"))
                .is_some()
        );
    }

    #[test]
    fn equal_objects_of_different_files_are_kept_once_and_charged_once() {
        let mut cache = ModuleCache::default();
        // Two containers' copies of one library: two files, one content.
        let first = cache
            .get_or_load(&key(1), Path::new("/a"), || Some(module("/lib/x.so")))
            .unwrap();
        let second = cache
            .get_or_load(&key(2), Path::new("/b"), || Some(module("/lib/x.so")))
            .unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(cache.bytes(), first.heap_bytes() + 2 * ENTRY_BYTES);
        // Another content (here, mapped from another path) is an object of its own.
        let other = cache
            .get_or_load(&key(3), Path::new("/c"), || Some(module("/lib/y.so")))
            .unwrap();
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(
            cache.bytes(),
            first.heap_bytes() + other.heap_bytes() + 3 * ENTRY_BYTES
        );
        // The shared object is charged until its last holder goes.
        cache.remove(&key(1));
        assert_eq!(
            cache.bytes(),
            first.heap_bytes() + other.heap_bytes() + 2 * ENTRY_BYTES
        );
        cache.remove(&key(2));
        assert_eq!(cache.bytes(), other.heap_bytes() + ENTRY_BYTES);
    }

    #[test]
    fn a_failure_is_retried_through_another_path_only() {
        let mut cache = ModuleCache::default();
        let gone = Path::new("/proc/7/map_files/1000-9000");
        assert!(cache.get_or_load(&key(1), gone, || None).is_none());
        assert!(
            cache
                .get_or_load(&key(1), gone, || panic!("cached"))
                .is_none()
        );
        let split = Path::new("/proc/7/map_files/1000-2000");
        let loaded = cache
            .get_or_load(&key(1), split, || Some(module("test")))
            .unwrap();
        assert!(
            cache
                .get_or_load(&key(1), gone, || panic!("cached"))
                .is_some()
        );
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.bytes(), loaded.heap_bytes() + ENTRY_BYTES);
    }

    #[test]
    fn a_file_that_reuses_an_inode_with_another_build_id_is_read_afresh() {
        let mut cache = ModuleCache::default();
        cache.get_or_load(&key(1), Path::new("/a"), || Some(module("test")));
        let newcomer = ObjectKey {
            file: file(1),
            build_id: Some(Box::new([1, 2, 3])),
        };
        let mut read = false;
        cache.get_or_load(&newcomer, Path::new("/a"), || {
            read = true;
            None
        });
        assert!(read, "not named by its predecessor's symbols");
        assert!(
            cache
                .get_or_load(&key(1), Path::new("/a"), || panic!("cached"))
                .is_some()
        );
    }

    #[test]
    fn an_object_loaded_before_it_is_mapped_is_cached_once() {
        let mut cache = ModuleCache::with_bounds(2, usize::MAX);
        let loaded = Arc::new(module("test"));
        cache.insert_loaded(file(1), Arc::clone(&loaded));
        cache.insert_loaded(file(1), Arc::clone(&loaded));
        assert_eq!(
            (cache.len(), cache.bytes()),
            (1, loaded.heap_bytes() + ENTRY_BYTES)
        );
        assert!(
            cache
                .get_or_load(&key(1), Path::new("/a"), || panic!("cached"))
                .is_some()
        );
    }
}
