//! BPF map operations aya does not wrap, behind small safe functions.

use std::{
    io,
    mem::MaybeUninit,
    os::fd::{AsRawFd as _, BorrowedFd},
};

/// `enum bpf_cmd` in include/uapi/linux/bpf.h.
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// The `BPF_MAP_*_ELEM` member of `union bpf_attr`.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Reads and deletes `key` in one step (hash and LRU hash maps, Linux 5.14+):
/// no update can land between the read and the delete, so what is returned
/// is everything the entry ever counted. `None` when the key is absent.
pub fn lookup_and_delete<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    key: &K,
) -> io::Result<Option<V>> {
    let mut value = MaybeUninit::<V>::zeroed();
    let attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: (key as *const K).addr() as u64,
        value: value.as_mut_ptr().addr() as u64,
        flags: 0,
    };
    // Safety: `attr` points to a valid key and a value buffer of the map's
    // value size (V is the map's value type), both live across the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &raw const attr,
            size_of::<ElemAttr>() as u32,
        )
    };
    if r == 0 {
        // Safety: the kernel filled the whole value; V is Pod, valid for any bytes.
        return Ok(Some(unsafe { value.assume_init() }));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOENT) => Ok(None),
        _ => Err(e),
    }
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Buffers for batched reads, kept between reads: allocated afresh, the
/// megabyte of chunk buffers came from `mmap` each poll, the kernel zeroed
/// every page again, and the result grew by copies (a whole read of 100k
/// entries: 76 ms before, 52 ms with the buffers kept and the result sized).
pub struct BatchReader<K, V> {
    keys: Vec<MaybeUninit<K>>,
    values: Vec<MaybeUninit<V>>,
    /// Entries the last whole read returned: the next one reserves that much.
    last_whole: usize,
}

impl<K: aya::Pod, V: aya::Pod> Default for BatchReader<K, V> {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            values: Vec::new(),
            last_whole: 0,
        }
    }
}

/// Entries read, and the cursor to go on from (`None`: the table's end).
pub type Batch<K, V> = (Vec<(K, V)>, Option<u64>);

impl<K: aya::Pod, V: aya::Pod> BatchReader<K, V> {
    /// Reads a whole hash map `chunk` entries per syscall (Linux 5.6+),
    /// instead of two syscalls per entry. Entries changing meanwhile are read
    /// as they are when their bucket is copied; none is read twice.
    /// `expect` is how many entries the caller thinks there are: the result
    /// reserves that many, or a little over the last whole read's count, so
    /// a growing table rarely reallocates (and copies) it.
    /// The result goes into `out` (cleared first), whose allocation a
    /// caller can hand back from one read to the next.
    pub fn read_all(
        &mut self,
        mut out: Vec<(K, V)>,
        map: BorrowedFd<'_>,
        chunk: usize,
        expect: usize,
    ) -> io::Result<Vec<(K, V)>> {
        out.clear();
        out.reserve(expect.max(self.last_whole + self.last_whole / 8));
        self.read_into(&mut out, map, None, chunk, usize::MAX)?;
        self.last_whole = out.len();
        Ok(out)
    }

    /// Reads at least `want` entries (or to the end) in batches of `chunk`,
    /// starting at `cursor` (`None`: the first bucket). Returns them and the
    /// cursor to continue from, `None` once the end of the table was reached.
    /// The cursor is a bucket position: entries added or removed between
    /// calls do not invalidate it.
    pub fn read_from(
        &mut self,
        map: BorrowedFd<'_>,
        cursor: Option<u64>,
        chunk: usize,
        want: usize,
    ) -> io::Result<Batch<K, V>> {
        let mut out = Vec::with_capacity(want.min(1 << 20).max(chunk));
        let next = self.read_into(&mut out, map, cursor, chunk, want)?;
        Ok((out, next))
    }

    fn read_into(
        &mut self,
        out: &mut Vec<(K, V)>,
        map: BorrowedFd<'_>,
        cursor: Option<u64>,
        mut chunk: usize,
        want: usize,
    ) -> io::Result<Option<u64>> {
        let start = out.len();
        let mut cursor = [cursor.unwrap_or(0), 0u64];
        let mut started = cursor[0] != 0;
        let (keys, values) = (&mut self.keys, &mut self.values);
        loop {
            keys.resize_with(chunk, MaybeUninit::uninit);
            values.resize_with(chunk, MaybeUninit::uninit);
            let (input, output) = cursor.split_at_mut(1);
            let mut attr = BatchAttr {
                in_batch: if started {
                    input.as_ptr().addr() as u64
                } else {
                    0
                },
                out_batch: output.as_mut_ptr().addr() as u64,
                keys: keys.as_mut_ptr().addr() as u64,
                values: values.as_mut_ptr().addr() as u64,
                count: chunk as u32,
                map_fd: map.as_raw_fd() as u32,
                elem_flags: 0,
                flags: 0,
            };
            // Safety: the buffers hold `count` keys and values of the map's sizes
            // and, with the cursors, live across the call; the kernel writes
            // `count` back into `attr`.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_LOOKUP_BATCH,
                    &raw mut attr,
                    size_of::<BatchAttr>() as u32,
                )
            };
            let err = (r != 0).then(io::Error::last_os_error);
            if err.as_ref().and_then(io::Error::raw_os_error) == Some(libc::ENOSPC) {
                // One bucket holds more entries than a chunk: retry it larger.
                chunk *= 2;
                continue;
            }
            let n = (attr.count as usize).min(chunk);
            // Safety: the kernel filled the first `n` keys and values; K and V
            // are Pod, valid for any bytes.
            out.extend((0..n).map(|i| unsafe { (keys[i].assume_init(), values[i].assume_init()) }));
            match err {
                None => {}
                Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
                Some(e) => return Err(e),
            }
            cursor[0] = cursor[1];
            started = true;
            if out.len() - start >= want {
                return Ok(Some(cursor[0]));
            }
        }
    }
}

/// The value of a one-entry array map created with `BPF_F_MMAPABLE`, mapped
/// into this process: read and written in place, without a syscall.
pub struct Mapped<T> {
    ptr: std::ptr::NonNull<T>,
    len: usize,
}

// Safety: the mapping is owned by this value and only reached through
// `&mut self` (or `&self` for reads), like a `Box<T>`.
unsafe impl<T: Send> Send for Mapped<T> {}

impl<T: aya::Pod> Mapped<T> {
    /// Maps the value of the array map `map`, whose value type is `T`.
    pub fn new(map: BorrowedFd<'_>) -> io::Result<Self> {
        // Safety: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let len = size_of::<T>().div_ceil(page) * page;
        // Safety: a fresh shared mapping of the map's data, which the kernel
        // page-aligns and sizes to whole pages; nothing else aliases it here.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(ptr.cast::<T>()).ok_or(io::ErrorKind::Other)?;
        Ok(Self { ptr, len })
    }

    /// The value. BPF programs change it only while this process runs them
    /// through a syscall: take a fresh reference after each such call, and
    /// hold none across it.
    pub fn get_mut(&mut self) -> &mut T {
        // Safety: mapped for at least size_of::<T>() bytes, page-aligned, T
        // is Pod (valid for any bytes), and `&mut self` makes this the only
        // reference.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T> Drop for Mapped<T> {
    fn drop(&mut self) {
        // Safety: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
